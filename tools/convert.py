#!/usr/bin/env python
"""Convert datasets to mm shards (see docs/data.md).

    tools/convert.py llava DATA.json --images ROOT --out DIR
    tools/convert.py captions TABLE.(csv|tsv|parquet) [--images ROOT] [--download] --out DIR
    tools/convert.py moscar FILE.parquet... (--images MIRROR | --download) --out DIR
    tools/convert.py preference PAIRS.jsonl --images ROOT --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mm.errors import MMError, report  # noqa: E402


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output shard directory")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    parser.add_argument("--prefix", default=None, help="shard name prefix (default: the source name)")
    parser.add_argument("--lang", default=None, help="language tag stored in each document")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _download(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--download", action="store_true", help="fetch images by URL")
    parser.add_argument("--workers", type=int, default=16, help="concurrent downloads")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per attempt")
    parser.add_argument("--max-image-bytes", type=int, default=32 << 20)
    parser.add_argument("--retries", type=int, default=2)


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="tools/convert.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = main.add_subparsers(dest="source", required=True)
    p = sub.add_parser("llava", help="LLaVA JSON -> chat shards")
    p.add_argument("json", type=Path)
    p.add_argument("--images", type=Path, required=True, help="image root the JSON paths are relative to")
    _common(p)
    p = sub.add_parser("captions", help="CSV/TSV/Parquet of image,caption -> interleaved one-image docs")
    p.add_argument("table", type=Path)
    p.add_argument("--images", type=Path, default=None, help="root for relative paths (default: the table's dir)")
    p.add_argument("--image-col", default=None)
    p.add_argument("--caption-col", default=None)
    _common(p)
    _download(p)
    p = sub.add_parser("moscar", help="mOSCAR Parquet -> interleaved docs (resumable)")
    p.add_argument("parquet", type=Path, nargs="+")
    p.add_argument("--images", type=Path, default=None, help="local mirror: files named by sha512")
    _common(p)
    _download(p)
    p = sub.add_parser("preference", help="JSON lines {image, question, chosen, rejected} -> preference docs")
    p.add_argument("jsonl", type=Path)
    p.add_argument("--images", type=Path, required=True)
    _common(p)
    return main


def _fetcher(args):
    from mm.data.download import Fetcher

    if args.workers < 1 or args.timeout <= 0 or args.retries < 0 or args.max_image_bytes < 1:
        raise MMError("--workers, --timeout and --max-image-bytes must be positive, --retries >= 0")
    return Fetcher(timeout=args.timeout, max_bytes=args.max_image_bytes, retries=args.retries, workers=args.workers)


def run(args) -> dict:
    from mm.data import convert

    if args.samples_per_shard < 1 or args.max_shard_bytes < 1:
        raise MMError("--samples-per-shard and --max-shard-bytes must be positive")
    out = Path(args.out)
    sizes = dict(samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes)
    progress = not args.quiet
    lang = args.lang or "en"
    for name in ("json", "table", "jsonl"):
        if hasattr(args, name) and not getattr(args, name).is_file():
            raise MMError(f"input not found: {getattr(args, name)}")
    if args.source == "llava":
        records = convert._read_json_records(args.json)
        docs = convert.llava_docs(records, args.images, lang)
        return convert.write_all(docs, out, args.prefix or "llava", total=len(records), desc="llava",
                                 progress=progress, **sizes)
    if args.source == "captions":
        table = convert.read_table(args.table)
        fetcher = _fetcher(args) if args.download else None
        docs = convert.caption_docs(table, args.images or args.table.parent, fetcher, args.image_col,
                                    args.caption_col, lang)
        return convert.write_all(docs, out, args.prefix or "captions", total=table.num_rows, desc="captions",
                                 progress=progress, **sizes)
    if args.source == "preference":
        records = convert._read_json_records(args.jsonl)
        docs = convert.preference_docs(records, args.images, lang)
        return convert.write_all(docs, out, args.prefix or "preference", total=len(records), desc="preference",
                                 progress=progress, **sizes)
    from mm.data.moscar import Mirror, convert_moscar

    for path in args.parquet:
        if not path.is_file():
            raise MMError(f"input not found: {path}")
    if args.download == (args.images is not None):
        raise MMError("moscar needs exactly one of --images MIRROR_DIR or --download")
    if args.images is not None and not args.images.is_dir():
        raise MMError(f"image mirror not found: {args.images}")
    source = _fetcher(args) if args.download else Mirror(args.images)
    return convert_moscar(args.parquet, out, source, lang=args.lang, progress=progress, **sizes)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        stats = run(args)
    except MMError as exc:
        return report(exc)
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
