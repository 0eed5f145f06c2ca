"""Datasets as they come, by name or by path: a LLaVA JSON, a caption table or preference pairs are converted to
shards once, on first use, into a cache; shard sources pass through unchanged.

A shard source (``data.train``, ``data.val``, ``trainer.eval_tasks[].data``) may be, besides a shard directory,
glob or file:
- a ``.json`` / ``.jsonl`` file: LLaVA conversations, image paths relative to the file's folder;
- a name from the dataset registry, ``data/datasets.yaml`` in the working directory (``$MM_DATASETS`` names
  another file). Relative paths in it are relative to the registry file's folder::

      llava_mix:                             # LLaVA JSON (a list of records, or JSON lines)
        llava: llava/llava_v1_5_mix665k.json
        images: llava                        # the root its image paths are relative to (default: the JSON's folder)
      coco_captions:                         # CSV / TSV / Parquet of image paths and captions
        captions: coco/captions.parquet
        images: coco/images
        image_col: file_name                 # optional, as `mm convert captions --image-col`
      pairs:                                 # JSON lines {image, question, chosen, rejected}
        preference: rlaif/pairs.jsonl
        images: rlaif/images
      synthetic_chat:                        # shards already: a directory, glob or file
        shards: synthetic/train/chat-*.tar

Conversion is ``mm convert``'s converters (entries that cannot be converted are dropped and counted, image paths
stay under their root: docs/security.md), into ``$MM_DATASETS_CACHE/<name>-<key>`` (default ``~/.cache/mm/datasets``). The
key covers the input file's path, size and modification time, the image root and the options: editing the file
converts again; replacing images in place does not (delete the cache folder). One process converts, under a file
lock; the others (every rank of a run) wait for it and reuse the result.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mm.errors import MMError

FORMATS = ("llava", "captions", "preference", "shards")
OPTIONS = ("images", "lang", "image_col", "caption_col")
CONVERTER_VERSION = 1  # bump when a converter's output changes: cached conversions are redone
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Dataset:
    """One registry entry (or a LLaVA JSON given by path), its paths absolute."""

    name: str
    format: str  # one of FORMATS
    path: str  # the input file (llava, captions, preference) or a shard directory / glob (shards)
    images: Path | None = None
    lang: str = "en"
    image_col: str | None = None
    caption_col: str | None = None


def registry_path() -> Path:
    return Path(os.environ.get("MM_DATASETS", "data/datasets.yaml"))


def cache_root() -> Path:
    if os.environ.get("MM_DATASETS_CACHE"):
        return Path(os.environ["MM_DATASETS_CACHE"])
    return Path(os.environ.get("MM_CACHE", Path.home() / ".cache" / "mm")) / "datasets"


def resolve_source(spec: str) -> str:
    """The shard directory, glob or file that ``spec`` stands for, converting (once) what is not shards yet."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        return converted(Dataset(name=path.stem, format="llava", path=str(path.resolve()),
                                 images=path.resolve().parent))
    if path.exists() or not NAME.fullmatch(spec):
        return spec
    dataset = load_registry(registry_path()).get(spec)
    if dataset is None:
        return spec  # list_shards says that nothing is there, naming the registry
    return dataset.path if dataset.format == "shards" else converted(dataset)


def load_registry(path: Path) -> dict[str, Dataset]:
    """The datasets named in ``path`` (an absent file: none); MMError (one line) on a malformed entry."""
    import yaml

    if not path.is_file():
        return {}
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MMError(f"dataset registry {path} cannot be read: {str(exc).splitlines()[0]}") from None
    if not isinstance(entries, dict):
        raise MMError(f"dataset registry {path} must map dataset names to entries")
    return {str(name): registry_entry(str(name), entry, path) for name, entry in entries.items()}


def registry_entry(name: str, entry, registry: Path) -> Dataset:
    where = f"dataset {name!r} in {registry}"
    if not NAME.fullmatch(name):
        raise MMError(f"{where}: a name is letters, digits, '_', '.' and '-'")
    if not isinstance(entry, dict):
        raise MMError(f"{where}: expected a mapping with one of {', '.join(FORMATS)}")
    formats = [key for key in FORMATS if key in entry]
    unknown = sorted(set(map(str, entry)) - set(FORMATS) - set(OPTIONS))
    if len(formats) != 1 or unknown:
        problem = f"unknown keys {unknown}" if unknown else f"give exactly one of {', '.join(FORMATS)}"
        raise MMError(f"{where}: {problem} (options: {', '.join(OPTIONS)})")
    if any(not isinstance(value, str) for value in entry.values()):
        raise MMError(f"{where}: every value is a string")
    base = registry.resolve().parent
    source = base / entry[formats[0]]
    if formats[0] != "shards" and not source.is_file():
        raise MMError(f"{where}: {formats[0]} file not found: {source}")
    images = base / entry["images"] if "images" in entry else source.parent
    if formats[0] in ("llava", "preference") and not images.is_dir():
        raise MMError(f"{where}: image root not found: {images}")
    return Dataset(name=name, format=formats[0], path=str(source), images=images, lang=entry.get("lang", "en"),
                   image_col=entry.get("image_col"), caption_col=entry.get("caption_col"))


def cache_key(dataset: Dataset) -> str:
    stat = os.stat(dataset.path)
    identity = [CONVERTER_VERSION, dataset.format, dataset.path, stat.st_size, stat.st_mtime_ns,
                str(dataset.images), dataset.lang, dataset.image_col, dataset.caption_col]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def converted(dataset: Dataset) -> str:
    """The cache folder holding ``dataset`` as shards, written now unless a finished conversion is there."""
    from filelock import FileLock

    root = cache_root()
    folder = root / f"{dataset.name}-{cache_key(dataset)}"
    if (folder / "complete").is_file():
        return str(folder)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "complete").is_file():  # another process may have finished while this one waited
            convert_into(dataset, folder)
    return str(folder)


def convert_into(dataset: Dataset, folder: Path) -> None:
    """Convert into a private folder, then move it into place with its ``complete`` marker last."""
    from mm.data import convert

    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)  # a folder without its marker: an earlier conversion that died
    print(f"dataset {dataset.name}: converting {dataset.path} to shards in {folder} (once)", file=sys.stderr,
          flush=True)
    try:
        docs, total, kind = documents(dataset)
        stats = convert.write_all(docs, partial, dataset.name, samples_per_shard=1000, max_shard_bytes=1 << 30,
                                  total=total, desc=dataset.name, progress=sys.stderr.isatty())
        if not stats["written"]:
            raise MMError(f"dataset {dataset.name}: no entry of {dataset.path} could be converted "
                          f"(dropped: {stats['dropped'] or 'none, the file is empty'})")
        stats.update(kind=kind, source=dataset.path, images=str(dataset.images))
        (partial / "stats.json").write_text(json.dumps(stats, indent=1))
        partial.rename(folder)
        (folder / "complete").write_text("")
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(stats["dropped"].items())) or "none"
    print(f"dataset {dataset.name}: {stats['written']:,} documents written, dropped: {dropped}", file=sys.stderr,
          flush=True)


def documents(dataset: Dataset):
    """(document stream for ``convert.write_all``, entry count, document kind) of a convertible dataset."""
    from mm.data import convert

    path = Path(dataset.path)
    if dataset.format == "captions":
        table = convert.read_table(path)
        return (convert.caption_docs(table, dataset.images, None, dataset.image_col, dataset.caption_col,
                                     dataset.lang), table.num_rows, "interleaved")
    records = convert.read_records(path)
    if dataset.format == "llava":
        return convert.llava_docs(records, dataset.images, dataset.lang), len(records), "chat"
    return convert.preference_docs(records, dataset.images, dataset.lang), len(records), "preference"
