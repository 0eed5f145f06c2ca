"""Eval documents: the data issue's shard format read through ``mm.data.shards``, plus the eval fields.

A chat doc's last assistant turn is the reference answer and the turns before it are the prompt;
``"references": [...]`` in the JSON replaces it with several references (caption refs, the 10 VQA answers).
An interleaved doc (a caption doc) is prompted with its images only, as plain text, and its text is the reference.
Multiple choice adds ``"options": [...]``, ``"answer": <index>`` and optionally ``"dimension": "..."``.
See docs/eval.md.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from PIL import Image

from mm.errors import MMError
from mm.prompt import content_text

TASKS = ("caption", "vqa", "mc")


@dataclass
class EvalSample:
    key: str
    messages: list[dict[str, Any]]  # the prompt turns (content parts, images as {"type": "image"})
    images: list[Image.Image]
    chat: bool  # False: plain continuation of an interleaved doc's images
    references: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    answer: int | None = None
    dimension: str = "all"


def _text(content) -> str:
    return content_text(content) if isinstance(content, (str, list)) else str(content)


def to_sample(key: str, doc: dict[str, Any], images: list[Image.Image], task: str) -> EvalSample:
    """Build an EvalSample; MMError names the document and what it lacks for ``task``."""
    if doc["kind"] == "chat":
        messages = list(doc["messages"])
        reference = None
        if messages and messages[-1].get("role") == "assistant":
            reference = _text(messages[-1].get("content", "")).strip()
            messages = messages[:-1]
        if not messages:
            raise MMError(f"eval document {key}: no prompt turn before the answer")
        sample = EvalSample(key, messages, images, chat=True, references=[reference] if reference else [])
    elif doc["kind"] == "interleaved":
        parts = [p for p in doc["content"] if p.get("type") == "image"]
        text = " ".join(p.get("text", "") for p in doc["content"] if p.get("type") == "text").strip()
        sample = EvalSample(key, [{"role": "user", "content": parts}], images, chat=False,
                            references=[text] if text else [])
    else:
        raise MMError(f"eval document {key}: kind {doc['kind']!r} cannot be evaluated (use chat or interleaved)")
    if "references" in doc:
        refs = doc["references"]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise MMError(f"eval document {key}: 'references' must be a non-empty list of strings")
        sample.references = [r.strip() for r in refs]
    if task == "mc":
        options, answer = doc.get("options"), doc.get("answer")
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise MMError(f"eval document {key}: task mc needs 'options', a list of at least 2 strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
            raise MMError(f"eval document {key}: 'answer' must be an option index from 0 to {len(options) - 1}")
        sample.options, sample.answer = options, answer
        sample.dimension = str(doc.get("dimension", "all"))
    elif not sample.references:
        raise MMError(f"eval document {key}: task {task} needs a reference (an assistant turn, text or 'references')")
    return sample


def read_samples(spec: str, task: str, skipped: Counter | None = None) -> Iterator[EvalSample]:
    """Eval samples from shards (a directory, glob, brace pattern or file). Unreadable documents (bad image,
    malformed JSON, truncated tar...) are skipped and counted by reason in ``skipped``."""
    from mm.data.bad import BadSample
    from mm.data.shards import TarError, iter_members, list_shards, parse_sample
    from mm.images import open_image

    if task not in TASKS:
        raise MMError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    skipped = Counter() if skipped is None else skipped
    for path in list_shards(spec):
        members = iter_members(path)
        while True:
            try:
                raw = next(members)
            except StopIteration:
                break
            except TarError:
                skipped["truncated_tar"] += 1
                break
            try:
                doc, blobs = parse_sample(raw)
                images = [open_image(blob, name=f"{raw['__key__']} image {i}") for i, blob in enumerate(blobs)]
            except BadSample as exc:
                skipped[exc.reason] += 1
                continue
            except MMError:
                skipped["bad_image"] += 1
                continue
            yield to_sample(raw["__key__"], doc, images, task)
