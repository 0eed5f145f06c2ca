"""Rows -> batches: sequence packing with block-diagonal causal attention, or right padding as a fallback.

Packing is best-fit over a window of open rows, in stream order, so it is deterministic given the documents.
A packed batch carries no attention mask: its ``position_ids`` restart at 0 for every document, and those are the
document boundaries the attention path keeps apart (mm/llm/attention.py: flash varlen, SDPA per document, or the
LLM's own mask derived from positions). No ``[B, 1, T, T]`` mask is built, so memory stays linear in T.
Padding at the end of a packed row forms its own block (positions restart there; it never carries loss). A
document's first token is no target (alone, nothing predicts it; packed, the previous document's last token would).
With ``max_image_tokens`` (``data.max_row_image_tokens``) a row also never holds more image tokens (tiles,
thumbnails, separators) than that: a document goes to a row with room for both its tokens and its image tokens.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from mm.data.render import Item, Sequence
from mm.errors import MMError
from mm.prompt import IGNORE


class Packer:
    """Best-fit packing of items into rows of ``seq_len`` tokens (and at most ``max_image_tokens`` image tokens,
    when given); yields lists of ``batch_size`` rows (each row a list of items). ``open_rows`` bounds how many
    partially filled rows wait for more documents. An item over either bound on its own is an MMError: the
    renderer drops such documents before they get here."""

    def __init__(self, seq_len: int, batch_size: int, open_rows: int | None = None,
                 max_image_tokens: int | None = None):
        self.seq_len, self.batch_size = seq_len, batch_size
        self.open_rows = open_rows or max(8, 4 * batch_size)
        self.max_image_tokens = max_image_tokens

    def __call__(self, items: Iterable[Item]) -> Iterator[list[list[Item]]]:
        image_cap = self.seq_len if self.max_image_tokens is None else self.max_image_tokens
        rows: list[list[Item]] = []
        room: list[int] = []  # tokens each open row can still take
        image_room: list[int] = []  # image tokens each open row can still take
        ready: list[list[Item]] = []
        for item in items:
            size, images = len(item.rows[0]), item.rows[0].image_tokens
            if size > self.seq_len or images > image_cap:
                raise MMError(f"document {item.key}: {size} tokens, {images} of them image tokens, exceed the row "
                              f"({self.seq_len} tokens, {image_cap} image tokens)")
            fits = [i for i, r in enumerate(room) if r >= size and image_room[i] >= images]
            if fits:
                best = min(fits, key=lambda i: (room[i], i))
                rows[best].append(item)
                room[best] -= size
                image_room[best] -= images
            else:
                if len(rows) >= self.open_rows:
                    fullest = min(range(len(rows)), key=lambda i: (room[i], i))
                    ready.append(rows.pop(fullest))
                    room.pop(fullest)
                    image_room.pop(fullest)
                rows.append([item])
                room.append(self.seq_len - size)
                image_room.append(image_cap - images)
            while len(ready) >= self.batch_size:
                yield ready[: self.batch_size]
                ready = ready[self.batch_size:]
        ready.extend(rows)  # end of a finite stream: flush, fullest first
        while ready:
            yield ready[: self.batch_size]
            ready = ready[self.batch_size:]


def _pixels(items: Iterable[Item], transform) -> dict[str, torch.Tensor]:
    """All images of the batch in order of appearance -> ``pixel_values`` ``[I, 3, H, W]`` (absent if none), and
    ``image_index`` ``[P]`` when a layout rearranges features: each item's index shifted past the features of the
    items before it (the contract of ``model.embed``)."""
    items = list(items)
    images = [image for item in items for image in item.images]
    if not images:
        return {}
    batch = {"pixel_values": torch.stack([transform(image) for image in images])}
    if any(item.image_index is not None for item in items):
        index, offset = [], 0
        for item in items:
            rows = len(item.images) * item.feature_rows_per_image
            index += [offset + i for i in (range(rows) if item.image_index is None else item.image_index)]
            offset += rows
        batch["image_index"] = torch.tensor(index, dtype=torch.long)
    return batch


def collate_packed(rows: list[list[Item]], pad_id: int, transform) -> dict[str, torch.Tensor]:
    """Packed rows -> ``input_ids``, ``labels``, ``position_ids`` ``[B, T]`` (positions restart per document)."""
    width = max(sum(len(item.rows[0]) for item in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for item in row:
            seq = item.rows[0]
            n = len(seq)
            input_ids[b, at: at + n] = torch.tensor(seq.ids)
            labels[b, at + 1: at + n] = torch.tensor(seq.labels[1:])  # the first token: no context, never a target
            position_ids[b, at: at + n] = torch.arange(n)
            at += n
        position_ids[b, at:] = torch.arange(width - at)  # padding: a block of its own
    ordered = [item for row in rows for item in row]
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, **_pixels(ordered, transform)}


def collate_padded(seqs: list[Sequence], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """One sequence per row, right-padded to the longest (or ``width``); 0/1 ``attention_mask`` ``[B, T]``."""
    width = width or max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    for b, seq in enumerate(seqs):
        n = len(seq)
        input_ids[b, :n] = torch.tensor(seq.ids)
        labels[b, :n] = torch.tensor(seq.labels)
        attention_mask[b, :n] = 1
    position_ids = torch.arange(width).expand(B, width).clone()
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}


def collate_rows(items: list[Item], pad_id: int, transform) -> dict[str, torch.Tensor]:
    """Unpacked LM batch: one document per row."""
    return {**collate_padded([item.rows[0] for item in items], pad_id), **_pixels(items, transform)}


def collate_preference(items: list[Item], pad_id: int, transform) -> dict:
    """``{"chosen", "rejected"}`` padded to one common width (row i of each is the same prompt), plus
    ``ref_logp_chosen`` / ``ref_logp_rejected`` ``[B]`` when every document carries them."""
    width = max(len(s) for item in items for s in item.rows)
    pixels = _pixels(items, transform)
    batch = {
        "chosen": {**collate_padded([item.rows[0] for item in items], pad_id, width), **pixels},
        "rejected": {**collate_padded([item.rows[1] for item in items], pad_id, width), **pixels},
    }
    if all(item.ref_logp for item in items):
        batch["ref_logp_chosen"] = torch.tensor([float(item.ref_logp["chosen"]) for item in items])
        batch["ref_logp_rejected"] = torch.tensor([float(item.ref_logp["rejected"]) for item in items])
    return batch
