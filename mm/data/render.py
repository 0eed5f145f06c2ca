"""Documents -> token rows: the LLM's chat template (or plain text), expanded placeholders, safe truncation.

Chat docs carry loss on assistant turns only; interleaved docs on all text (with EOS); image placeholders never.
Truncation to ``seq_len`` never cuts an image's placeholder run in half: the partial image and everything after it
are dropped. ``Renderer.item`` turns one parsed document into what the packer consumes, or raises ``BadSample``:
``kind_mismatch`` (not the kind the run asks for), ``image_mismatch`` (its ``<image>`` markers, counted after
rendering, do not match its images: a literal ``<image>`` in its text, say), ``no_target`` (no loss token at all),
``too_long`` (no loss token left after truncation, or its first image does not fit), ``too_many_image_tokens``
(its images need more image tokens than the layout's ``max_image_tokens`` or ``data.max_row_image_tokens`` allow,
even at one tile each), ``malformed_json`` (it cannot be rendered, the chat template refuses it), or an image
reason (every image is decoded, even past a cut).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from jinja2 import TemplateError

from mm.data.bad import BadSample
from mm.errors import MMError
from mm.images import open_image
from mm.prompt import IGNORE, IMAGE_TOKEN, content_text, render_chat, render_plain


@dataclass
class Sequence:
    """One rendered document (or one side of a preference pair)."""

    ids: list[int]
    labels: list[int]
    num_images: int  # complete images kept after truncation
    markers: int = 0  # <image> markers of the whole rendered document, before truncation
    full_length: int = 0  # tokens of the whole document (placeholders expanded), before truncation
    targets: int = 0  # loss tokens of the whole document, before truncation
    image_tokens: int = 0  # tokens of the kept images' spans (tiles, thumbnails, separators), after truncation

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Item:
    """What the packer/collator consumes: rendered rows plus decoded images (None while skipping)."""

    key: str
    rows: list[Sequence]  # one row, or [chosen, rejected] for preference pairs
    images: list = field(default_factory=list)  # decoded RGB PIL images (or their tiles), in order of appearance
    ref_logp: dict[str, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # a layout that rearranges features (anyres llava_next): per image token, the row of this item's features
    # [len(images) * feature_rows_per_image, D] it takes (mm.layouts.ImageTiler.feature_index); None: all in order
    image_index: list[int] | None = None
    feature_rows_per_image: int = 0


@dataclass
class Renderer:
    """Everything the loader takes from the model (picklable, so DataLoader workers get a copy, not the model).
    With a tiling layout (``mm.layouts``), an item's images are its kept images' tiles in token order.
    ``max_row_image_tokens`` (``data.max_row_image_tokens``) caps the image tokens of one row: a document's
    images are laid out within it (fewer tiles) and a document that cannot fit it is dropped."""

    tokenizer: Any
    image_token_id: int
    tokens_per_image: int
    transform: Callable | None  # PIL RGB -> [3, H, W]
    seq_len: int
    tiler: Any = None  # mm.layouts.ImageTiler: each image's tiles and token span (None: one tile per image)
    max_row_image_tokens: int | None = None  # image tokens one row may hold (None: no cap)

    @classmethod
    def from_model(cls, model, seq_len: int) -> "Renderer":
        return cls(model.tokenizer, model.image_token_id, model.tokens_per_image, model.encoder.transform, seq_len,
                   model.image_tiler)

    # ----- text -------------------------------------------------------------------------------------------
    def _expand(self, ids: list[int], labels: list[int], spans: list[list[int]] | None = None) -> Sequence:
        """Each ``<image>`` marker -> its span (``spans[i]``: the layout's tile tokens and separators; default
        ``tokens_per_image`` image tokens), unlabelled; cut to ``seq_len`` only where no span is split."""
        out_ids, out_labels, runs = [], [], []  # runs: (start, length) of each image's span
        for token, label in zip(ids, labels):
            if token == self.image_token_id:
                span = spans[len(runs)] if spans is not None and len(runs) < len(spans) else \
                    [token] * self.tokens_per_image
                runs.append((len(out_ids), len(span)))
                out_ids.extend(span)
                out_labels.extend([IGNORE] * len(span))
            else:
                out_ids.append(token)
                out_labels.append(label)
        cut = len(out_ids)
        if cut > self.seq_len:
            cut = self.seq_len
            for start, length in runs:
                if start < cut < start + length:
                    cut = start  # never keep part of an image
        kept = [length for start, length in runs if start + length <= cut]
        targets = sum(1 for label in out_labels if label != IGNORE)
        return Sequence(out_ids[:cut], out_labels[:cut], len(kept), len(runs), len(out_ids), targets, sum(kept))

    def render_lm(self, doc: dict[str, Any], spans: list[list[int]] | None = None) -> Sequence:
        """Chat (and preference as chat with the chosen answer) or interleaved -> one row."""
        try:
            if doc["kind"] == "interleaved":
                ids, labels = render_plain(self.tokenizer, doc["content"], add_eos=True)
            else:
                messages = list(doc["messages"])
                if doc["kind"] == "preference":
                    messages.append({"role": "assistant", "content": _answer(doc["chosen"])})
                ids, labels = render_chat(self.tokenizer, messages)
        except _RENDER_ERRORS as exc:
            raise BadSample("malformed_json", f"cannot render document: {exc}") from None
        return self._expand(ids, labels, spans)

    def render_pair(self, doc: dict[str, Any], spans: list[list[int]] | None = None) -> tuple[Sequence, Sequence]:
        try:
            rows = []
            for side in ("chosen", "rejected"):
                messages = list(doc["messages"]) + [{"role": "assistant", "content": _answer(doc[side])}]
                rows.append(self._expand(*render_chat(self.tokenizer, messages), spans))
        except _RENDER_ERRORS as exc:
            raise BadSample("malformed_json", f"cannot render preference pair: {exc}") from None
        return rows[0], rows[1]

    # ----- documents --------------------------------------------------------------------------------------
    def item(self, key: str, doc: dict[str, Any], images: list[bytes], kind: str) -> Item:
        """One parsed document -> an ``Item`` for loader kind ``kind`` ("lm", "chat", "interleaved",
        "preference"), images decoded; raises ``BadSample`` for a document this run must not use."""
        wanted = ("chat", "interleaved", "preference") if kind == "lm" else (kind,)
        if doc["kind"] not in wanted:
            raise BadSample("kind_mismatch", f"kind {doc['kind']}; the run reads {kind}")
        decoded = self.decode(images, key, len(images))  # every image, so a bad one is found past a cut
        tiled, spans = self.lay_out(decoded)
        rows = list(self.render_pair(doc, spans)) if kind == "preference" else [self.render_lm(doc, spans)]
        for row in rows:
            if row.markers != len(images):
                raise BadSample("image_mismatch", f"{row.markers} {IMAGE_TOKEN} markers after rendering but "
                                f"{len(images)} image(s) (a literal {IMAGE_TOKEN} in its text?)")
        for row in rows:
            if row.targets == 0:
                raise BadSample("no_target", "no token to learn from (an interleaved document without text, a "
                                "conversation without an assistant turn)")
            if images and row.num_images == 0:
                raise BadSample("too_long", f"{row.full_length} tokens; its first image does not fit in "
                                f"seq_len={self.seq_len}")
            if row.num_images != rows[0].num_images:  # a pair's two sides must keep the same images
                raise BadSample("too_long", f"{row.full_length} tokens; seq_len={self.seq_len} cuts the chosen "
                                "and rejected answers at different images")
            if all(label < 0 for label in row.labels):
                raise BadSample("too_long", f"{row.full_length} tokens; no loss token left within "
                                f"seq_len={self.seq_len}")
            if self.max_row_image_tokens is not None and row.image_tokens > self.max_row_image_tokens:
                raise BadSample("too_many_image_tokens", f"its {row.num_images} image(s) take {row.image_tokens} "
                                f"tokens; data.max_row_image_tokens={self.max_row_image_tokens}")
        kept = rows[0].num_images
        pictures = decoded[:kept] if tiled is None else self.tiler.tiles(tiled[:kept])  # what the encoder sees
        index = None if tiled is None else self.tiler.feature_index(tiled[:kept])
        return Item(key, rows, pictures, doc.get("ref_logp"), {"kind": doc["kind"], "lang": doc.get("lang")},
                    index, self.tokens_per_image)

    def lay_out(self, images: list) -> tuple[list | None, list[list[int]] | None]:
        """The document's images laid out by the model's layout within the tighter of its ``max_image_tokens``
        and ``max_row_image_tokens``, and each one's token span; ``(None, None)`` when every image is one tile of
        ``tokens_per_image`` tokens (the ``fixed`` layout, or no tiler)."""
        if self.tiler is None or not images or self.tiler.layout.static:
            return None, None
        budget = min((b for b in (self.tiler.layout.max_image_tokens, self.max_row_image_tokens) if b is not None),
                     default=None)
        try:
            tiled = self.tiler.lay_out(images, budget)
        except MMError as exc:  # the budget cannot fit these images even at one tile each
            which = "data.max_row_image_tokens" if budget == self.max_row_image_tokens else \
                "the layout's max_image_tokens"
            raise BadSample("too_many_image_tokens", f"{exc} ({which})") from None
        return tiled, self.tiler.spans(tiled)

    # ----- images -----------------------------------------------------------------------------------------
    def decode(self, images: list[bytes], key: str, keep: int) -> list:
        """Decode every image (so bad ones are found even past a truncation); return the first ``keep``."""
        return [open_checked(data, f"{key}.{i}") for i, data in enumerate(images)][:keep]

    def pixels(self, images: list) -> torch.Tensor:
        """PIL images -> ``[I, 3, H, W]`` with the encoder's transform."""
        return torch.stack([self.transform(image) for image in images])


_RENDER_ERRORS = (MMError, KeyError, TypeError, AttributeError, ValueError, TemplateError)


def _answer(answer: Any) -> str:
    text = content_text(answer)
    if IMAGE_TOKEN in text:
        raise MMError("preference answers must be text")
    return text


def open_checked(data: bytes, name: str):
    """``mm.images.open_image`` with the failure classified into a BadSample reason."""
    if not data:
        raise BadSample("zero_bytes", f"image {name} is empty")
    try:
        return open_image(data, name)
    except MMError as exc:
        message = str(exc)
        if "too large" in message:
            reason = "decompression_bomb"
        elif "truncated" in message:
            reason = "truncated_image"
        else:
            reason = "corrupt_image"
        raise BadSample(reason, message) from None
