"""The shard format: WebDataset tars where one sample is one document.

Members of a sample with key ``K`` (no dots in ``K``):

- ``K.json``: ``{"kind": "interleaved" | "chat" | "preference", "lang": str, "source": {...}, ...}``
  - interleaved: ``"content": [{"type": "image", "image": "0.jpg"}, {"type": "text", "text": "..."}, ...]``
  - chat: ``"messages": [{"role": "user", "content": [...]}, {"role": "assistant", "content": [...]}, ...]``
  - preference: ``"messages"`` (the prompt turns), ``"chosen"`` and ``"rejected"`` (assistant answers, a string or
    content parts), optional ``"ref_logp": {"chosen": float, "rejected": float}``.
- ``K.<i>.<ext>``: the image bytes an image part names by ``"image": "<i>.<ext>"`` (jpg, png, webp), unchanged.

Writing goes through webdataset's ``TarWriter`` into ``*.tmp`` files renamed on close, so a shard on disk is
always complete.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

import webdataset as wds

from mm.errors import MMError

KINDS = ("interleaved", "chat", "preference")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")


def safe_key(text: str) -> str:
    """A document key webdataset can group by: no dots or slashes."""
    return _KEY_BAD.sub("_", str(text)) or "_"


def image_ext(data: bytes, default: str = "jpg") -> str:
    """File extension from the magic bytes (the original bytes are stored unchanged)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"GIF8",):
        return "gif"
    return default


def image_parts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every image part of a document, in order of appearance (prompt turns, then chosen, then rejected)."""
    parts: list[dict[str, Any]] = []

    def visit(content):
        if isinstance(content, list):
            parts.extend(p for p in content if isinstance(p, dict) and p.get("type") == "image")

    visit(doc.get("content"))
    for message in doc.get("messages") or []:
        visit(message.get("content"))
    visit(doc.get("chosen"))
    visit(doc.get("rejected"))
    return parts


def validate(doc: Any) -> dict[str, Any]:
    """Check the JSON's shape; raise MMError naming what is wrong."""
    if not isinstance(doc, dict):
        raise MMError("document JSON is not an object")
    kind = doc.get("kind")
    if kind not in KINDS:
        raise MMError(f"document kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "interleaved" and not isinstance(doc.get("content"), list):
        raise MMError("interleaved document needs a 'content' list")
    if kind in ("chat", "preference"):
        messages = doc.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise MMError(f"{kind} document needs a 'messages' list of {{role, content}}")
    if kind == "preference" and (doc.get("chosen") is None or doc.get("rejected") is None):
        raise MMError("preference document needs 'chosen' and 'rejected'")
    for part in image_parts(doc):
        if not isinstance(part.get("image"), str):
            raise MMError("image part without an 'image' member name")
    return doc


class ShardWriter:
    """Write documents into ``DIR/<prefix>-NNNNNN.tar`` shards, each atomically (tmp file, then rename).

    A shard closes after ``samples_per_shard`` documents or once it holds ``max_shard_bytes``.
    ``add(key, doc, images)`` takes the images as bytes in order of the document's image parts and names them.
    """

    def __init__(self, out: str | Path, prefix: str = "shard", samples_per_shard: int = 1000,
                 max_shard_bytes: int = 1 << 30, start: int = 0):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prefix, self.samples_per_shard, self.max_shard_bytes = prefix, samples_per_shard, max_shard_bytes
        self.index = start
        self.written: list[Path] = []
        self._tar = None
        self._count = self._bytes = 0

    def _open(self):
        self._path = self.out / f"{self.prefix}-{self.index:06d}.tar"
        self._tmp = self._path.with_name(self._path.name + ".tmp")
        self._tar = wds.TarWriter(str(self._tmp), encoder=False)
        self._count = self._bytes = 0

    def _close(self):
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._tmp, self._path)
        self.written.append(self._path)
        self._tar = None
        self.index += 1

    def add(self, key: str, doc: dict[str, Any], images: list[bytes]) -> None:
        parts = image_parts(doc)
        if len(parts) != len(images):
            raise MMError(f"document {key} names {len(parts)} images but {len(images)} were given")
        sample = {"__key__": safe_key(key)}
        for i, (part, data) in enumerate(zip(parts, images)):
            name = f"{i}.{image_ext(data)}"
            part["image"] = name
            sample[name] = data
        sample["json"] = json.dumps(validate(doc), ensure_ascii=False).encode()
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        self._bytes += sum(len(v) + 1024 for k, v in sample.items() if k != "__key__")
        if self._count >= self.samples_per_shard or self._bytes >= self.max_shard_bytes:
            self._close()

    def close(self) -> list[Path]:
        self._close()
        return self.written

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self._tar is not None:  # leave no partial shard behind
            self._tar.close()
            self._tmp.unlink(missing_ok=True)


class TarError(Exception):
    """A shard could not be read to its end (truncated or not a tar)."""


def iter_members(path: str | Path) -> Iterator[dict[str, bytes]]:
    """Raw samples ``{"__key__", "__url__", "<suffix>": bytes}`` of one shard, grouped by key.

    A read error ends the shard: the sample being read is discarded and ``TarError`` is raised after every
    complete sample before it was yielded.
    """
    current: dict[str, Any] | None = None
    try:
        with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as stream:
            for info in stream:
                if not info.isreg():
                    continue
                key, suffix = wds.tariterators.base_plus_ext(info.name)
                if key is None:
                    continue
                data = stream.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": str(path)}
                current[suffix] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise TarError(f"{path}: {exc}") from None
    if current is not None:
        yield current


def parse_sample(sample: dict[str, bytes]) -> tuple[dict[str, Any], list[bytes]]:
    """JSON and image bytes of a raw sample. Raises ``BadSample`` with a reason."""
    from mm.data.bad import BadSample

    if "json" not in sample:
        raise BadSample("missing_member", f"{sample['__key__']}: no .json member")
    try:
        doc = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSample("malformed_json", f"{sample['__key__']}: {exc}") from None
    try:
        validate(doc)
    except MMError as exc:
        raise BadSample("malformed_json", f"{sample['__key__']}: {exc}") from None
    images = []
    for part in image_parts(doc):
        if part["image"] not in sample:
            raise BadSample("missing_member", f"{sample['__key__']}: no member {part['image']}")
        images.append(sample[part["image"]])
    return doc, images


def list_shards(spec: str | Path) -> list[str]:
    """A directory (its ``*.tar``, recursively), a glob, a brace pattern or one file -> sorted shard paths; a
    LLaVA JSON or a dataset name of the registry first becomes its converted shards (``mm.data.datasets``)."""
    import glob

    import braceexpand

    from mm.data.datasets import registry_path, resolve_source

    spec = resolve_source(str(spec))
    if os.path.isdir(spec):
        found = sorted(str(p) for p in Path(spec).rglob("*.tar"))
    else:
        found = sorted({p for pattern in braceexpand.braceexpand(spec) for p in glob.glob(pattern)})
    if not found:
        raise MMError(f"no shards found at {spec!r} (expected a directory of .tar files, a glob, a file, a LLaVA "
                      f".json or a dataset named in {registry_path()})")
    return found


def iter_docs(spec: str | Path) -> Iterator[tuple[str, dict[str, Any], list[bytes]]]:
    """``(key, doc, image bytes)`` of every well-formed document under ``spec`` (for tools and tests)."""
    for path in list_shards(spec):
        for sample in iter_members(path):
            doc, images = parse_sample(sample)
            yield sample["__key__"], doc, images
