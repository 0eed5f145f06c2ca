"""Eval documents: the data issue's shard format read through ``mm.data.shards``, plus the eval fields.

A chat doc's last assistant turn is the reference answer and the turns before it are the prompt;
``"references": [...]`` in the JSON replaces it with several references (caption refs, the 10 VQA answers).
An interleaved doc (a caption doc) is prompted with its images only, as plain text, and its text is the reference.
Multiple choice adds ``"options": [...]``, ``"answer": <index>`` and optionally ``"dimension": "..."``.
See docs/eval.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from PIL import Image

from mm.data.bad import BadCounter, BadSample
from mm.errors import MMError
from mm.prompt import IMAGE_TOKEN, content_text, count_images

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


def read_samples(spec: str, task: str, skipped: BadCounter | None = None) -> Iterator[EvalSample]:
    """Eval samples from shards (a directory, glob, brace pattern or file). A document that cannot be evaluated
    (bad image, malformed JSON, ``<image>`` markers that do not match its images, missing what ``task`` needs,
    truncated tar...) is skipped and recorded in ``skipped`` with its reason, shard and key."""
    from mm.data.render import open_checked
    from mm.data.shards import TarError, iter_members, list_shards, parse_sample

    if task not in TASKS:
        raise MMError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    skipped = BadCounter(keep=None) if skipped is None else skipped
    for path in list_shards(spec):
        members = iter_members(path)
        while True:
            try:
                raw = next(members)
            except StopIteration:
                break
            except TarError as exc:
                skipped.record(BadSample("truncated_tar", str(exc).removeprefix(f"{path}: "), shard=path))
                break
            key = raw["__key__"]
            try:
                doc, blobs = parse_sample(raw)
                images = [open_checked(blob, f"{key}.{i}") for i, blob in enumerate(blobs)]
                try:
                    sample = to_sample(key, doc, images, task)
                except MMError as exc:
                    raise BadSample("task_mismatch", str(exc).removeprefix(f"eval document {key}: ")) from None
                except (KeyError, TypeError, AttributeError) as exc:
                    raise BadSample("malformed_json", f"cannot read it as an eval document: {exc!r}") from None
                try:
                    markers = count_images(sample.messages)
                except (MMError, KeyError, TypeError, AttributeError) as exc:
                    raise BadSample("malformed_json", f"cannot read its prompt: {exc}") from None
                if markers != len(images):
                    raise BadSample("image_mismatch", f"its prompt has {markers} {IMAGE_TOKEN} markers but "
                                    f"{len(images)} image(s)")
            except BadSample as exc:
                exc.key, exc.shard = key, path
                skipped.record(exc)
                continue
            skipped.ok()
            yield sample


def describe_skipped(skipped: BadCounter) -> str:
    """``3 skipped: task_mismatch=3 (e.g. document doc000 of vqa.tar: ...)``, or "" when nothing was skipped."""
    counts = {**skipped.bad, **skipped.dropped}
    if not counts:
        return ""
    top = max(counts, key=counts.__getitem__)
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    return f"{sum(counts.values())} skipped: {reasons} (e.g. {skipped.example(top)})"
