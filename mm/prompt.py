"""Turning conversations and interleaved documents into token ids, loss labels and image placeholders.

Messages follow the content-part convention of transformers chat templates:
``{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}`` (a plain string is fine too).
Each image part becomes one ``<image>`` marker, later expanded to the image's tokens: the adapter's token count
per tile of its layout, with the layout's separators (mm/layouts).
"""
from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from mm.errors import MMError

IMAGE_TOKEN = "<image>"
IGNORE = -100  # label value that carries no loss


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Register ``<image>`` as a special token (idempotent) and return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def content_text(content: str | list[dict[str, Any]]) -> str:
    """Flatten content parts to text, an ``<image>`` marker per image part."""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        kind = part.get("type")
        if kind == "image":
            pieces.append(IMAGE_TOKEN)
        elif kind == "text":
            pieces.append(part.get("text", ""))
        else:
            raise MMError(f"unknown content part type {kind!r} (expected 'image' or 'text')")
    return "".join(pieces)


def count_images(messages: list[dict[str, Any]]) -> int:
    return sum(content_text(m["content"]).count(IMAGE_TOKEN) for m in messages)


def _template(tokenizer, messages, add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _tokenize_with_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of ``text``; labels are the ids of tokens starting inside a span, IGNORE elsewhere and on
    image placeholders."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    labels = [
        token if token != image_id and any(lo <= start < hi for lo, hi in spans) else IGNORE
        for token, (start, _) in zip(ids, encoded["offset_mapping"])
    ]
    return ids, labels


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's own chat template; labels cover the assistant turns only
    (their text and end-of-turn token), everything else is IGNORE."""
    flat = [{"role": m["role"], "content": content_text(m["content"])} for m in messages]
    text = _template(tokenizer, flat, add_generation_prompt)
    spans = []
    for i, message in enumerate(flat):
        if message["role"] != "assistant":
            continue
        before = _template(tokenizer, flat[:i], add_generation_prompt=True)
        through = _template(tokenizer, flat[: i + 1], add_generation_prompt=False)
        if not text.startswith(through) or not through.startswith(before):
            raise MMError("the tokenizer's chat template does not render conversations prefix by prefix")
        spans.append((len(before), len(through)))
    return _tokenize_with_spans(tokenizer, text, spans)


def render_plain(
    tokenizer: PreTrainedTokenizerBase, content: str | list[dict[str, Any]], add_eos: bool = False
) -> tuple[list[int], list[int]]:
    """Render an interleaved document as plain text (no chat template): BOS if the tokenizer has one, then the
    text with ``<image>`` markers; every text token carries loss, image markers never do."""
    text = (tokenizer.bos_token or "") + content_text(content) + (tokenizer.eos_token if add_eos else "")
    start = len(tokenizer.bos_token or "")
    return _tokenize_with_spans(tokenizer, text, [(start, len(text))])


def expand_images(
    ids: list[int], labels: list[int], image_token_id: int, tokens_per_image: int | None = None,
    spans: list[list[int]] | None = None,
) -> tuple[list[int], list[int]]:
    """Replace each ``<image>`` id by its span: ``tokens_per_image`` image ids, or, per image in order, its ids in
    ``spans`` (a laid-out image's tile tokens and separators). Nothing in a span carries loss."""
    if spans is not None:
        marked = ids.count(image_token_id)
        if marked != len(spans):
            raise MMError(f"the prompt has {marked} image markers but {len(spans)} laid-out images")
    elif tokens_per_image is None:
        raise MMError("expand_images needs tokens_per_image or spans")
    pending = iter(spans) if spans is not None else None
    out_ids: list[int] = []
    out_labels: list[int] = []
    for token, label in zip(ids, labels):
        if token == image_token_id:
            span = next(pending) if pending is not None else [image_token_id] * tokens_per_image
            out_ids.extend(span)
            out_labels.extend([IGNORE] * len(span))
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


def truncate_images(ids: list[int], labels: list[int], image_token_id: int, spans: list[list[int]],
                    seq_len: int) -> tuple[list[int], list[int], int]:
    """``expand_images`` with ``spans``, then cut to ``seq_len`` tokens without splitting an image's span (its
    tiles and separators): a cut inside one drops that image and everything after it. Returns the ids, labels
    and how many images were kept whole (the data loader's hook for laid-out images)."""
    out_ids, out_labels = expand_images(ids, labels, image_token_id, spans=spans)
    starts, position = [], 0
    pending = iter(spans)
    for token in ids:
        if token == image_token_id:
            starts.append((position, len(next(pending))))
            position += starts[-1][1]
        else:
            position += 1
    cut = min(seq_len, len(out_ids))
    for start, length in starts:
        if start < cut < start + length:
            cut = start
    kept = sum(1 for start, length in starts if start + length <= cut)
    return out_ids[:cut], out_labels[:cut], kept


def user_message(prompt: str, num_images: int) -> dict[str, Any]:
    """One user turn: the images first unless ``prompt`` already places them with ``<image>`` markers."""
    marked = prompt.count(IMAGE_TOKEN)
    if marked and marked != num_images:
        raise MMError(f"prompt has {marked} {IMAGE_TOKEN} markers but {num_images} images were given")
    if marked:
        return {"role": "user", "content": prompt}
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]}
