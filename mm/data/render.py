"""Documents -> token rows: the LLM's chat template (or plain text), expanded placeholders, safe truncation.

Chat docs carry loss on assistant turns only; interleaved docs on all text (with EOS); image placeholders never.
Truncation to ``seq_len`` never cuts an image's placeholder run in half: the partial image and everything after it
are dropped; a document left without any loss token is dropped (counted as ``too_long``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

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

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Item:
    """What the packer/collator consumes: rendered rows plus decoded images (None while skipping)."""

    key: str
    rows: list[Sequence]  # one row, or [chosen, rejected] for preference pairs
    images: list = field(default_factory=list)  # decoded RGB PIL images, in order of appearance
    ref_logp: dict[str, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Renderer:
    """Everything the loader takes from the model (picklable, so DataLoader workers get a copy, not the model)."""

    tokenizer: Any
    image_token_id: int
    tokens_per_image: int
    transform: Callable | None  # PIL RGB -> [3, H, W]
    seq_len: int

    @classmethod
    def from_model(cls, model, seq_len: int) -> "Renderer":
        return cls(model.tokenizer, model.image_token_id, model.tokens_per_image, model.encoder.transform, seq_len)

    # ----- text -------------------------------------------------------------------------------------------
    def _expand(self, ids: list[int], labels: list[int]) -> Sequence:
        out_ids, out_labels, starts = [], [], []
        for token, label in zip(ids, labels):
            if token == self.image_token_id:
                starts.append(len(out_ids))
                out_ids.extend([token] * self.tokens_per_image)
                out_labels.extend([IGNORE] * self.tokens_per_image)
            else:
                out_ids.append(token)
                out_labels.append(label)
        cut = len(out_ids)
        if cut > self.seq_len:
            cut = self.seq_len
            for start in starts:
                if start < cut < start + self.tokens_per_image:
                    cut = start  # never keep part of an image
        kept = sum(1 for start in starts if start + self.tokens_per_image <= cut)
        return Sequence(out_ids[:cut], out_labels[:cut], kept)

    def render_lm(self, doc: dict[str, Any]) -> Sequence:
        """Chat (and preference as chat with the chosen answer) or interleaved -> one row."""
        try:
            if doc["kind"] == "interleaved":
                ids, labels = render_plain(self.tokenizer, doc["content"], add_eos=True)
            else:
                messages = list(doc["messages"])
                if doc["kind"] == "preference":
                    messages.append({"role": "assistant", "content": _answer(doc["chosen"])})
                ids, labels = render_chat(self.tokenizer, messages)
        except (MMError, KeyError, TypeError, AttributeError) as exc:
            raise BadSample("malformed_json", f"cannot render document: {exc}") from None
        return self._expand(ids, labels)

    def render_pair(self, doc: dict[str, Any]) -> tuple[Sequence, Sequence]:
        try:
            rows = []
            for side in ("chosen", "rejected"):
                messages = list(doc["messages"]) + [{"role": "assistant", "content": _answer(doc[side])}]
                rows.append(self._expand(*render_chat(self.tokenizer, messages)))
        except (MMError, KeyError, TypeError, AttributeError) as exc:
            raise BadSample("malformed_json", f"cannot render preference pair: {exc}") from None
        return rows[0], rows[1]

    # ----- images -----------------------------------------------------------------------------------------
    def decode(self, images: list[bytes], key: str, keep: int) -> list:
        """Decode every image (so bad ones are found even past a truncation); return the first ``keep``."""
        return [open_checked(data, f"{key}.{i}") for i, data in enumerate(images)][:keep]

    def pixels(self, images: list) -> torch.Tensor:
        """PIL images -> ``[I, 3, H, W]`` with the encoder's transform."""
        return torch.stack([self.transform(image) for image in images])


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
