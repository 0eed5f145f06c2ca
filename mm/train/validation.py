"""Evaluation during training: the held-out loss on ``data.val``, and ``mm eval`` tasks (``trainer.eval_tasks``).

**Held-out loss**: the stage's loss under ``no_grad`` on ``data.val`` batches.
The batches come from the training loader (``mm.data.build_loader`` with ``resample=False``), the same first
``trainer.eval_batches`` of them (every batch of one pass when unset) at every evaluation, so the curve compares
like with like. Each rank evaluates its own slice; the means are averaged over ranks. Results are named
``eval/<term>`` (``eval/loss``, ``eval/lm``, ...).

**Tasks**: each ``trainer.eval_tasks`` entry runs ``mm.evaluate.evaluate`` (greedy; caption, vqa or mc) on the first
``limit`` documents of its shards, on rank 0 while the other ranks wait; its numeric metrics are logged as
``eval/<name>/<metric>`` (``eval/vqa/accuracy``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from itertools import islice

import torch
import torch.distributed as dist

from mm.errors import MMError
from mm.train.config import EvalTask, TrainConfig
from mm.train.epochs import count_batches, ranks, smallest_across_ranks


class Validation:
    def __init__(self, config: TrainConfig, model, kind: str | None):
        from mm.data import build_loader

        data = dataclasses.replace(config.data, train=config.data.val, weights=None, resample=False)
        rank, world = ranks()
        limit = config.trainer.eval_batches
        self.batches = smallest_across_ranks([count_batches(data, model, kind, limit)])[0]
        if self.batches == 0:
            raise MMError(f"data.val ({config.data.val}) gives no batch" + (" on some rank" if world > 1 else "")
                          + ": check the shards and data.batch_size / data.seq_len")
        self.loader = build_loader(data, model, rank=rank, world_size=world, kind=kind)

    def __call__(self, forward: Callable[[dict], tuple[torch.Tensor, dict]],
                 module: torch.nn.Module) -> dict[str, float]:
        """Mean of each loss term over the batches; ``forward(batch) -> (loss, parts)`` runs the stage's loss.
        ``module`` goes to eval mode (dropout off) meanwhile; the caller restores its training mode."""
        module.eval()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for batch in islice(self.loader, self.batches):
                loss, parts = forward(batch)
                for key, value in {"loss": loss, **parts}.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        keys = ["loss"] + sorted(k for k in sums if k != "loss")
        means = torch.tensor([sums[k] / self.batches for k in keys], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(means)
            means /= dist.get_world_size()
        return {f"eval/{k}": float(v) for k, v in zip(keys, means)}


class EvalTasks:
    def __init__(self, tasks: list[EvalTask]):
        self.tasks = tasks

    def __call__(self, model) -> dict[str, float]:
        """Scores of ``model`` (in eval mode meanwhile; the caller restores its training mode) on rank 0."""
        from mm.evaluate.runner import evaluate
        from mm.evaluate.samples import read_samples

        out: dict[str, float] = {}
        if ranks()[0] == 0:
            model.eval()
            for task in self.tasks:
                samples = islice(read_samples(task.data, task.task), task.limit)
                scores = evaluate(model, samples, task.task, batch_size=task.batch_size,
                                  max_new_tokens=task.max_new_tokens, progress=False)
                name = task.name or task.task
                out.update({f"eval/{name}/{k}": float(v) for k, v in scores.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"})
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return out
