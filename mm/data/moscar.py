"""mOSCAR Parquet -> interleaved shards, resumably.

A row holds ``images: [{img_idx, sha512, url}]``, ``text: [{text, text_idx}]`` and ``metadata`` (a list holding
one struct, or a struct) with ``node_order`` like ``img_#000002|txt_#000000|txt_#000001``; index gaps are normal.
The content follows ``node_order``. Images come from a local mirror (files named by their sha512, any extension)
or are downloaded (``Fetcher``). Documents whose images all fail are dropped; partly failed ones keep their text
in order without the failed images.

Each block of ``samples_per_shard`` input rows becomes ``<stem>-<block>-NNNNNN.tar`` (more than one part only
past ``max_shard_bytes``) and then ``<stem>-<block>.done.json`` with its counts; a re-run skips blocks that have
their marker and redoes the others from scratch.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from mm.data.download import FetchError
from mm.data.shards import ShardWriter

_LANG_DIR = re.compile(r"^[a-z]{2,3}_[A-Z][a-z]{3}$")


def node_order(metadata: Any) -> list[str]:
    if isinstance(metadata, list):
        metadata = metadata[0] if metadata else {}
    order = (metadata or {}).get("node_order") or ""
    return [node for node in order.split("|") if node]


def doc_url(metadata: Any) -> str | None:
    if isinstance(metadata, list):
        metadata = metadata[0] if metadata else {}
    return (metadata or {}).get("url")


def plan(row: dict[str, Any]) -> list[tuple[str, Any]]:
    """``[("text", str) | ("image", {img_idx, sha512, url}), ...]`` in document order."""
    texts = {t["text_idx"]: t["text"] for t in row.get("text") or []}
    images = {i["img_idx"]: i for i in row.get("images") or []}
    order = node_order(row.get("metadata"))
    if not order:  # no order given: images first, then the text by index
        order = [f"img_{k}" for k in sorted(images)] + [f"txt_{k}" for k in sorted(texts)]
    nodes = []
    for node in order:
        kind, _, index = node.partition("_")
        if kind == "txt" and index in texts:
            nodes.append(("text", texts[index]))
        elif kind == "img" and index in images:
            nodes.append(("image", images[index]))
    return nodes


class Mirror:
    """A local directory of images named by sha512 (with or without an extension)."""

    def __init__(self, root: Path):
        self.files = {p.name.split(".")[0].lower(): p for p in Path(root).rglob("*") if p.is_file()}

    def fetch_all(self, requests):
        out = []
        for url, sha in requests:
            path = self.files.get((sha or "").lower())
            out.append(path.read_bytes() if path else FetchError("not_in_mirror", url))
        return out


def build_doc(nodes, fetched: dict[str, bytes | FetchError], lang: str, source: dict):
    """Content parts and image bytes, failed images left out; None when the doc had images and all failed."""
    content, images, failures = [], [], Counter()
    for kind, value in nodes:
        if kind == "text":
            text = value if not content else "\n" + value
            content.append({"type": "text", "text": text})
            continue
        data = fetched[value["url"]]
        if isinstance(data, FetchError):
            failures[data.reason] += 1
        else:
            content.append({"type": "image", "image": ""})
            images.append(data)
    had_images = any(kind == "image" for kind, _ in nodes)
    if (had_images and not images) or not content:
        return None, failures
    return ({"kind": "interleaved", "lang": lang, "source": source, "content": content}, images), failures


def convert_moscar(paths: list[Path], out: Path, source, samples_per_shard: int = 1000,
                   max_shard_bytes: int = 1 << 30, lang: str | None = None, progress: bool = True) -> dict:
    """Convert Parquet files; ``source`` is a ``Fetcher`` (download) or a ``Mirror``. Returns counts."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    totals: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    rows_total = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    with tqdm(total=rows_total, desc="moscar", unit="doc", disable=not progress) as bar:
        for path in paths:
            path = Path(path)
            doc_lang = lang or (path.parent.name if _LANG_DIR.match(path.parent.name) else "und")
            parquet = pq.ParquetFile(path)
            for block, batch in enumerate(parquet.iter_batches(batch_size=samples_per_shard)):
                rows = batch.to_pylist()
                marker = out / f"{path.stem}-{block:06d}.done.json"
                if marker.exists():
                    done = json.loads(marker.read_text())
                    totals.update(done["counts"])
                    failures.update(done["image_failures"])
                    totals["blocks_skipped"] += 1
                    bar.update(len(rows))
                    continue
                for stale in out.glob(f"{path.stem}-{block:06d}-*.tar*"):
                    stale.unlink()
                counts, block_failures = _convert_block(rows, path, block, out, source, doc_lang,
                                                        samples_per_shard, max_shard_bytes)
                marker.write_text(json.dumps({"counts": counts, "image_failures": block_failures}))
                totals.update(counts)
                failures.update(block_failures)
                bar.update(len(rows))
                bar.set_postfix(written=totals["written"], dropped=totals["dropped_all_images_failed"])
    return {**dict(totals), "image_failures": dict(failures)}


def _convert_block(rows, path: Path, block: int, out: Path, source, lang, samples_per_shard, max_shard_bytes):
    plans = [plan(row) for row in rows]
    wanted = {}
    for nodes in plans:
        for kind, value in nodes:
            if kind == "image":
                wanted.setdefault(value["url"], value.get("sha512"))
    fetched = dict(zip(wanted, source.fetch_all(list(wanted.items()))))
    counts: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    with ShardWriter(out, f"{path.stem}-{block:06d}", samples_per_shard, max_shard_bytes) as writer:
        for offset, (row, nodes) in enumerate(zip(rows, plans)):
            number = block * samples_per_shard + offset
            meta = {"file": path.name, "row": number, "url": doc_url(row.get("metadata"))}
            result, doc_failures = build_doc(nodes, fetched, lang, meta)
            failures.update(doc_failures)
            counts["images_failed"] += sum(doc_failures.values())
            if result is None:
                counts["dropped_all_images_failed" if nodes else "dropped_empty"] += 1
                continue
            doc, images = result
            counts["images_ok"] += len(images)
            counts["partial_docs"] += bool(doc_failures)
            writer.add(f"{path.stem}_{number:09d}", doc, images)
            counts["written"] += 1
    return dict(counts), dict(failures)
