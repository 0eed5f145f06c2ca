"""Converters from common formats to shards: LLaVA JSON (chat), caption tables (interleaved one-image docs),
preference JSON lines. (mOSCAR lives in mm/data/moscar.py.) Each returns a stats dict; entries that cannot be
converted are dropped and counted by reason, never written half.

Image paths in the inputs come from strangers: they are read only from under the image root (no absolute paths,
no ``..`` or symlink that leads out) and only when the bytes decode as an image (docs/security.md)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from mm.data.download import FetchError, Fetcher
from mm.data.shards import ShardWriter
from mm.errors import MMError
from mm.images import open_image
from mm.prompt import IMAGE_TOKEN

Doc = tuple[str, dict[str, Any], list[bytes]]  # key, document JSON, image bytes in order


def write_all(docs: Iterable[Doc | str], out, prefix: str, samples_per_shard: int, max_shard_bytes: int,
              total: int | None = None, desc: str = "convert", progress: bool = True) -> dict[str, Any]:
    """Write documents (a ``str`` in the stream = one dropped entry, the string its reason), with a progress bar."""
    from tqdm import tqdm

    dropped: Counter[str] = Counter()
    written = 0
    with ShardWriter(out, prefix, samples_per_shard, max_shard_bytes) as writer, \
            tqdm(total=total, desc=desc, unit="doc", disable=not progress) as bar:
        for entry in docs:
            if isinstance(entry, str):
                dropped[entry] += 1
            else:
                writer.add(*entry)
                written += 1
            bar.update()
            bar.set_postfix(written=written, dropped=sum(dropped.values()), refresh=False)
    return {"written": written, "dropped": dict(dropped), "shards": [str(p) for p in writer.written]}


def split_markers(text: str) -> list[dict[str, Any]]:
    """``"<image>\\nWhat is this?"`` -> content parts, one image part per marker."""
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            parts.append({"type": "image", "image": ""})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON file (a list, or one object) or of JSON lines; MMError when it is neither."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MMError(f"{path} cannot be read as UTF-8 text: {exc}") from None
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise MMError(f"{path} is neither JSON nor JSON lines: {exc}") from None


def read_image_under(root: Path, name) -> bytes | str:
    """The bytes of image ``name`` (a relative path) under ``root``, or the reason it is refused:
    ``malformed_entry`` (not a path), ``absolute_image_path``, ``image_outside_root`` (``..`` or a symlink that
    leads out of ``root``), ``missing_image`` or ``undecodable_image`` (the bytes are not an image)."""
    if not isinstance(name, str) or not name or "\0" in name:
        return "malformed_entry"
    if Path(name).is_absolute():
        return "absolute_image_path"
    try:
        base = Path(root).resolve()
        path = (base / name).resolve()  # follows every symlink on the way
    except (OSError, RuntimeError):  # a symlink loop
        return "missing_image"
    if not path.is_relative_to(base):
        return "image_outside_root"
    try:
        if not path.is_file():  # absent, a directory, a FIFO or device that would block or never end
            return "missing_image"
        data = path.read_bytes()
    except OSError:  # unreadable
        return "missing_image"
    try:
        open_image(data, name)
    except MMError:
        return "undecodable_image"
    return data


def _attach_images(content: list[dict[str, Any]], markers: int, names: list[str], image_root: Path):
    """LLaVA convention: without ``<image>`` markers the images go first in ``content`` (changed in place);
    with markers their count must equal the image names. Returns ``(image bytes, None)`` or ``(None, reason)``."""
    if names and markers == 0:
        content[:0] = [{"type": "image", "image": ""} for _ in names]
    elif markers != len(names):
        return None, "image_count_mismatch"
    images = []
    for name in names:
        data = read_image_under(image_root, name)
        if isinstance(data, str):
            return None, data
        images.append(data)
    return images, None


def _image_names(record: dict[str, Any]) -> list | None:
    """The record's ``image`` field as a list (one name or a list of names); None when it is neither."""
    names = record.get("image") or []
    if isinstance(names, str):
        return [names]
    return list(names) if isinstance(names, list) else None


# ----- LLaVA --------------------------------------------------------------------------------------------------
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def llava_docs(records: list[dict[str, Any]], image_root: Path, lang: str = "en") -> Iterator[Doc | str]:
    for n, record in enumerate(records):
        names = _image_names(record) if isinstance(record, dict) else None
        try:
            messages = [{"role": ROLES[turn["from"]], "content": split_markers(turn["value"])}
                        for turn in record["conversations"]]
        except (KeyError, TypeError, AttributeError):
            names = None
        if names is None:
            yield "malformed_entry"
            continue
        markers = sum(p["type"] == "image" for m in messages for p in m["content"])
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None and names and markers == 0:  # nowhere to put the images
            yield "malformed_entry"
            continue
        images, problem = _attach_images(first["content"] if first else [], markers, names, image_root)
        if problem:
            yield problem
            continue
        key = f"llava{n:08d}_{record.get('id', '')}"
        yield key, {"kind": "chat", "lang": lang, "source": {"llava_id": record.get("id"), "images": names},
                    "messages": messages}, images


# ----- captions -----------------------------------------------------------------------------------------------
IMAGE_COLUMNS = ("url", "image", "image_path", "image_url", "path", "file", "filepath")
CAPTION_COLUMNS = ("caption", "text", "alt", "alt_text")


def read_table(path: Path):
    """CSV / TSV / Parquet -> pyarrow Table."""
    import pyarrow.csv
    import pyarrow.parquet

    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv", ".tsv"):
        raise MMError(f"{path}: expected a .csv, .tsv or .parquet table")
    try:
        if suffix == ".parquet":
            return pyarrow.parquet.read_table(path)
        options = pyarrow.csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
        return pyarrow.csv.read_csv(path, parse_options=options)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid and ArrowIOError are these
        raise MMError(f"cannot read the table {path}: {' '.join(str(exc).split())[:300]}") from None


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str:
    if wanted:
        if wanted not in columns:
            raise MMError(f"column {wanted!r} not found; columns are: {', '.join(columns)}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise MMError(f"no {what} column (looked for {', '.join(candidates)}); columns are: {', '.join(columns)}")


def caption_docs(table, image_root: Path, fetcher: Fetcher | None, image_col: str | None = None,
                 caption_col: str | None = None, lang: str = "en", chunk: int = 256) -> Iterator[Doc | str]:
    image_col = _pick(table.column_names, image_col, IMAGE_COLUMNS, "image")
    caption_col = _pick(table.column_names, caption_col, CAPTION_COLUMNS, "caption")
    rows = list(zip(table.column(image_col).to_pylist(), table.column(caption_col).to_pylist()))
    for start in range(0, len(rows), chunk):
        batch = rows[start: start + chunk]
        urls = [(str(src), None) for src, _ in batch if _is_url(src)]
        fetched = iter(fetcher.fetch_all(urls) if fetcher and urls else [])
        for offset, (source, text) in enumerate(batch):
            if source is None or not isinstance(text, str) or not text.strip():
                yield "malformed_entry"
                continue
            if _is_url(source):
                if fetcher is None:
                    yield "url_without_download"
                    continue
                data = next(fetched)
                if isinstance(data, FetchError):
                    yield f"download_{data.reason}"
                    continue
            else:
                data = read_image_under(image_root, str(source))
                if isinstance(data, str):
                    yield data
                    continue
            doc = {"kind": "interleaved", "lang": lang, "source": {"image": str(source)},
                   "content": [{"type": "image", "image": ""}, {"type": "text", "text": text}]}
            yield f"cap{start + offset:09d}", doc, [data]


def _is_url(source) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


# ----- preference ---------------------------------------------------------------------------------------------
def preference_docs(records: list[dict[str, Any]], image_root: Path, lang: str = "en") -> Iterator[Doc | str]:
    for n, record in enumerate(records):
        try:
            question, chosen, rejected = record["question"], record["chosen"], record["rejected"]
        except (KeyError, TypeError):
            yield "malformed_entry"
            continue
        names = _image_names(record)
        if names is None or not all(isinstance(x, str) for x in (question, chosen, rejected)):
            yield "malformed_entry"
            continue
        content = split_markers(question)
        markers = sum(p["type"] == "image" for p in content)
        images, problem = _attach_images(content, markers, names, image_root)
        if problem:
            yield problem
            continue
        doc = {"kind": "preference", "lang": lang, "source": {"id": record.get("id"), "images": names},
               "messages": [{"role": "user", "content": content}], "chosen": chosen, "rejected": rejected}
        if isinstance(record.get("ref_logp"), dict):
            try:
                doc["ref_logp"] = {"chosen": float(record["ref_logp"]["chosen"]),
                                   "rejected": float(record["ref_logp"]["rejected"])}
            except (KeyError, TypeError, ValueError):
                yield "malformed_entry"
                continue
        yield f"pref{n:08d}_{record.get('id', '')}", doc, images
