"""``mm convert``: convert datasets to mm shards (see docs/data.md).

    mm convert llava DATA.json --images ROOT --out DIR
    mm convert captions TABLE.(csv|tsv|parquet) [--images ROOT] [--download] --out DIR
    mm convert moscar FILE.parquet... (--images MIRROR | --download) --out DIR
    mm convert preference PAIRS.jsonl --images ROOT --out DIR
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mm.errors import MMError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output shard directory")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    parser.add_argument("--prefix", default=None, help="shard name prefix (default: the source name)")
    parser.add_argument("--lang", default=None, help="language tag stored in each document")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _download(parser: argparse.ArgumentParser) -> None:
    """The downloader's flags (docs/security.md: what is refused by default and how to relax it)."""
    parser.add_argument("--download", action="store_true", help="fetch images by URL")
    parser.add_argument("--workers", type=int, default=16, help="concurrent downloads")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per connect and per read")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds in all for one URL")
    parser.add_argument("--max-image-bytes", type=int, default=32 << 20)
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--allow-private-addresses", action="store_true",
                        help="also reach loopback and private addresses (tests, trusted private mirrors)")
    parser.add_argument("--allow-address", action="append", default=[], metavar="ADDR[:PORT]",
                        help="also reach this address or network (repeatable), e.g. 10.1.0.0/16, 127.0.0.1:8000")


def add_parser(subparsers) -> None:
    main = subparsers.add_parser("convert", help="convert LLaVA / caption / mOSCAR / preference data to shards",
                                 description=__doc__)
    main.set_defaults(run=run)
    sources = main.add_subparsers(dest="source", required=True)
    p = sources.add_parser("llava", help="LLaVA JSON -> chat shards")
    p.add_argument("json", type=Path)
    p.add_argument("--images", type=Path, required=True, help="image root the JSON paths are relative to")
    _common(p)
    p = sources.add_parser("captions", help="CSV/TSV/Parquet of image,caption -> interleaved one-image docs")
    p.add_argument("table", type=Path)
    p.add_argument("--images", type=Path, default=None, help="root for relative paths (default: the table's dir)")
    p.add_argument("--image-col", default=None)
    p.add_argument("--caption-col", default=None)
    _common(p)
    _download(p)
    p = sources.add_parser("moscar", help="mOSCAR Parquet -> interleaved docs (resumable)")
    p.add_argument("parquet", type=Path, nargs="+")
    p.add_argument("--images", type=Path, default=None, help="local mirror: files named by sha512")
    p.add_argument("--keep-unverified", action="store_true", help="keep downloaded images whose row has no sha512")
    _common(p)
    _download(p)
    p = sources.add_parser("preference", help="JSON lines {image, question, chosen, rejected} -> preference docs")
    p.add_argument("jsonl", type=Path)
    p.add_argument("--images", type=Path, required=True)
    _common(p)


def _fetcher(args):
    from mm.data.download import Fetcher

    if (args.workers < 1 or not 0 < args.timeout < math.inf or not 0 < args.deadline < math.inf  # NaN fails too
            or args.retries < 0 or args.max_image_bytes < 1):
        raise MMError("--workers, --timeout, --deadline and --max-image-bytes must be positive, --retries >= 0")
    return Fetcher(timeout=args.timeout, deadline=args.deadline, max_bytes=args.max_image_bytes, retries=args.retries,
                   workers=args.workers, allow_private=args.allow_private_addresses,
                   allow_addresses=tuple(args.allow_address))


def write_shards(args: argparse.Namespace) -> dict:
    """Write the shards the parsed ``mm convert`` arguments ask for; returns the converter's stats."""
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
    if args.source != "moscar" and args.images is not None and not args.images.is_dir():
        raise MMError(f"image root not found: {args.images}")
    from mm.train.preflight import writable_dir

    writable_dir(out, "--out", keep=False)  # before a long conversion, not at its first shard
    if args.source == "llava":
        records = convert.read_records(args.json)
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
        records = convert.read_records(args.jsonl)
        docs = convert.preference_docs(records, args.images, lang)
        return convert.write_all(docs, out, args.prefix or "preference", total=len(records), desc="preference",
                                 progress=progress, **sizes)
    from mm.data.moscar import Mirror, convert_moscar

    import pyarrow.parquet

    if args.download == (args.images is not None):  # the flags first: checking them reads nothing
        raise MMError("moscar needs exactly one of --images MIRROR_DIR or --download")
    for path in args.parquet:
        if not path.is_file():
            raise MMError(f"input not found: {path}")
        _readable(pyarrow.parquet.ParquetFile, path)  # its footer: a file that is no Parquet fails here
    if args.images is not None and not args.images.is_dir():
        raise MMError(f"image mirror not found: {args.images}")
    source = _fetcher(args) if args.download else Mirror(args.images)
    return convert_moscar(args.parquet, out, source, lang=args.lang, progress=progress,
                          keep_unverified=args.keep_unverified, **sizes)


def _readable(read, path: Path):
    """``read(path)``; a table pyarrow cannot parse (not CSV / Parquet, empty, cut short) is one MMError."""
    try:
        return read(path)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid and ArrowIOError are these
        raise MMError(f"cannot read the table {path}: {' '.join(str(exc).split())[:300]}") from None


def run(args: argparse.Namespace) -> int:
    print(json.dumps(write_shards(args), indent=1))
    return 0
