"""mOSCAR Parquet -> interleaved shards, resumably.

A row holds ``images: [{img_idx, sha512, url}]``, ``text: [{text, text_idx}]`` and ``metadata`` (a list holding
one struct, or a struct) with ``node_order`` like ``img_#000002|txt_#000000|txt_#000001``; index gaps are normal.
The content follows ``node_order``. Images come from a local mirror (files named by their sha512, any extension)
or are downloaded (``Fetcher``). Every image is checked against its own row's sha512 and must decode; an image
without a sha512 is "unverified" and left out unless ``keep_unverified`` (counted either way). Documents whose
images all fail are dropped; partly failed ones keep their text in order without the failed images.

Each block of ``samples_per_shard`` input rows becomes ``<stem>-<block>-NNNNNN.tar`` (more than one part only
past ``max_shard_bytes``) and then ``<stem>-<block>.done.json`` with its counts; a re-run skips blocks that have
their marker and redoes the others from scratch.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from mm.data.convert import read_image_under
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
    texts = {t.get("text_idx"): t["text"] for t in row.get("text") or [] if isinstance(t, dict)
             and isinstance(t.get("text"), str)}
    images = {i.get("img_idx"): i for i in row.get("images") or [] if isinstance(i, dict)}
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


def image_key(image: dict) -> tuple[Any, str | None]:
    """What an image node is fetched and looked up by: its URL and its own sha512 (None when missing or empty)."""
    return image.get("url"), (image.get("sha512") or None)


class Mirror:
    """A local directory of images named by sha512 (with or without an extension). A file is used only when it
    lies under the directory (symlinks resolved), its bytes match the sha512 and decode as an image."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.files = {p.name.split(".")[0].lower(): p.relative_to(self.root) for p in self.root.rglob("*")
                      if p.is_symlink() or p.is_file()}

    def fetch_all(self, requests):
        out = []
        for url, sha in requests:
            path = self.files.get(str(sha).lower()) if sha else None
            data = read_image_under(self.root, str(path)) if path else "missing_image"
            if isinstance(data, str):
                out.append(FetchError({"missing_image": "not_in_mirror", "undecodable_image": "undecodable",
                                       "image_outside_root": "outside_mirror"}.get(data, data), url))
            elif hashlib.sha512(data).hexdigest() != str(sha).lower():
                out.append(FetchError("sha512_mismatch", url))
            else:
                out.append(data)
        return out


def build_doc(nodes, fetched: dict[tuple, bytes | FetchError], lang: str, source: dict):
    """Content parts and image bytes, failed images left out; None when the doc had images and all failed."""
    content, images, failures = [], [], Counter()
    for kind, value in nodes:
        if kind == "text":
            text = value if not content else "\n" + value
            content.append({"type": "text", "text": text})
            continue
        data = fetched[image_key(value)]
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
                   max_shard_bytes: int = 1 << 30, lang: str | None = None, progress: bool = True,
                   keep_unverified: bool = False) -> dict:
    """Convert Parquet files; ``source`` is a ``Fetcher`` (download) or a ``Mirror``. Returns counts.
    ``keep_unverified``: also fetch and keep images whose row has no sha512 (counted as ``images_unverified``)."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    totals: Counter[str] = Counter(written=0)
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
                                                        samples_per_shard, max_shard_bytes, keep_unverified)
                marker.write_text(json.dumps({"counts": counts, "image_failures": block_failures}))
                totals.update(counts)
                failures.update(block_failures)
                bar.update(len(rows))
                bar.set_postfix(written=totals["written"], dropped=totals["dropped_all_images_failed"])
    return {**dict(totals), "image_failures": dict(failures)}


def _convert_block(rows, path: Path, block: int, out: Path, source, lang, samples_per_shard, max_shard_bytes,
                   keep_unverified: bool):
    plans = [plan(row) for row in rows]
    keys = list(dict.fromkeys(image_key(value) for nodes in plans for kind, value in nodes if kind == "image"))
    wanted = [key for key in keys if key[1] or keep_unverified]
    fetched = {key: FetchError("unverified", str(key[0])) for key in keys}
    fetched.update(zip(wanted, source.fetch_all(wanted)))
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
            counts["images_unverified"] += sum(kind == "image" and image_key(value)[1] is None
                                               and not isinstance(fetched[image_key(value)], FetchError)
                                               for kind, value in nodes)
            counts["partial_docs"] += bool(doc_failures)
            writer.add(f"{path.stem}_{number:09d}", doc, images)
            counts["written"] += 1
    return dict(counts), dict(failures)
