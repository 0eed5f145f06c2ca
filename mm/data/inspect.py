"""Shard statistics: counts by kind and language, images per document, token lengths, bad samples."""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from mm.data.bad import BadSample
from mm.data.render import Renderer, open_checked
from mm.data.shards import TarError, iter_members, list_shards, parse_sample


def inspect_shards(spec, renderer: Renderer, bins: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)) -> dict:
    """Read every sample under ``spec`` (decoding every image) and summarise. ``renderer.seq_len`` is ignored
    for lengths (full untruncated lengths are reported); with a tiling layout each image counts its tiles and
    separators, as training renders it."""
    kinds: Counter[str] = Counter()
    langs: Counter[str] = Counter()
    images: Counter[int] = Counter()
    lengths: list[int] = []
    bad: Counter[str] = Counter()
    examples: dict[str, str] = {}
    shards = list_shards(spec)
    full = dataclasses.replace(renderer, seq_len=1 << 30)

    def record(error: BadSample):
        bad[error.reason] += 1
        examples.setdefault(error.reason, error.detail)

    for path in shards:
        try:
            for sample in iter_members(path):
                try:
                    doc, blobs = parse_sample(sample)
                    decoded = [open_checked(blob, f"{sample['__key__']}.{i}") for i, blob in enumerate(blobs)]
                    _, spans = full.lay_out(decoded)
                    rows = full.render_pair(doc, spans) if doc["kind"] == "preference" else \
                        (full.render_lm(doc, spans),)
                except BadSample as exc:
                    record(exc)
                    continue
                kinds[doc["kind"]] += 1
                langs[str(doc.get("lang"))] += 1
                images[len(blobs)] += 1
                lengths.extend(len(row) for row in rows)
        except TarError as exc:
            record(BadSample("truncated_tar", str(exc)))
    histogram: dict[str, int] = {}
    lower = 0
    for upper in bins:
        histogram[f"{lower + 1}-{upper}"] = sum(lower < n <= upper for n in lengths)
        lower = upper
    histogram[f">{lower}"] = sum(n > lower for n in lengths)
    documents = sum(kinds.values())
    summary: dict[str, Any] = {
        "shards": len(shards), "documents": documents, "kinds": dict(kinds), "languages": dict(langs),
        "images_per_doc": {str(k): v for k, v in sorted(images.items())},
        "tokens": {"min": min(lengths, default=0), "max": max(lengths, default=0),
                   "mean": round(sum(lengths) / len(lengths), 1) if lengths else 0, "histogram": histogram},
        "bad": dict(bad), "bad_examples": examples,
    }
    return summary
