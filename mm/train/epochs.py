"""Finite data: counting a pass's batches before training, and ``trainer.epochs`` passes as one stream.

The LR schedule needs the run's length up front, so ``trainer.epochs`` counts the micro-batches of each pass
before the engine starts: the real loader (same shards, packing, bad-sample skipping, ranks and workers) with a
transform that skips the pixel work, so a pass costs reading, decoding and tokenising, not the model. Pass ``e``
shuffles with ``data.seed + e``. Every rank takes the smallest count of any rank, so all ranks stop together.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from itertools import islice

import torch
import torch.distributed as dist

from mm.data.config import DataConfig
from mm.errors import MMError


def _no_pixels(image) -> torch.Tensor:
    return torch.zeros(1)


def ranks() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def smallest_across_ranks(counts: list[int]) -> list[int]:
    """Elementwise minimum of ``counts`` over all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return counts
    tensor = torch.tensor(counts, dtype=torch.long)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return [int(c) for c in tensor]


def count_batches(data: DataConfig, model, kind: str | None, limit: int | None = None) -> int:
    """Batches this rank's loader yields for ``data`` (one pass; at most ``limit``), without pixel transforms."""
    from mm.data import Renderer, build_loader

    rank, world = ranks()
    renderer = dataclasses.replace(Renderer.from_model(model, data.seq_len), transform=_no_pixels)
    loader = build_loader(data, renderer, rank=rank, world_size=world, kind=kind)
    return sum(1 for _ in islice(loader, limit))


def pass_data(data: DataConfig, epoch: int) -> DataConfig:
    return dataclasses.replace(data, resample=False, seed=data.seed + epoch)


def plan_epochs(data: DataConfig, model, kind: str | None, epochs: int, grad_accum: int,
                max_steps: int | None) -> tuple[list[int], int]:
    """(micro-batches of each pass, same on every rank; optimizer steps of the run). Micro-batches left over
    after the last whole step are not trained on; ``max_steps`` caps the run."""
    counts = smallest_across_ranks([count_batches(pass_data(data, e), model, kind) for e in range(epochs)])
    steps = sum(counts) // grad_accum
    if steps < 1:
        raise MMError(f"trainer.epochs={epochs}: the data gives {sum(counts)} batches in all, fewer than one step "
                      f"(trainer.grad_accum={grad_accum}); add data or lower data.batch_size")
    return counts, min(steps, max_steps) if max_steps else steps


def epoch_batches(data: DataConfig, model, kind: str | None, counts: list[int], skip_batches: int) -> Iterator[dict]:
    """The passes one after another (pass ``e`` cut to ``counts[e]``), starting ``skip_batches`` in (resume)."""
    from mm.data import build_loader

    rank, world = ranks()
    for epoch, count in enumerate(counts):
        if skip_batches >= count:
            skip_batches -= count
            continue
        loader = build_loader(pass_data(data, epoch), model, rank=rank, world_size=world, kind=kind,
                              skip_batches=skip_batches)
        yield from islice(loader, count - skip_batches)
        skip_batches = 0


def epoch_of(counts: list[int], micro_batches: int) -> float:
    """Passes done after ``micro_batches`` (2.5 = halfway through the third pass)."""
    for epoch, count in enumerate(counts):
        if micro_batches < count:
            return epoch + micro_batches / count
        micro_batches -= count
    return float(len(counts))
