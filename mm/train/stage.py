"""Apply a stage's trainable set: globs over the model's own parameter names, each with a learning rate.

Everything no glob matches is frozen. Must run before ``deepspeed.initialize`` (DeepSpeed fixes the trainable
set and builds optimizer state only for the parameter groups returned here).
"""
from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn

from mm.errors import MMError


def parse_trainable(entries: list[Any], default_lr: float) -> list[tuple[str, float]]:
    """``TrainableGroup``s, ``{pattern, lr}`` mappings or bare glob strings -> ``[(pattern, lr)]``."""
    from mm.schema import check
    from mm.train.config import TrainableGroup

    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = TrainableGroup(entry)
        entry = check(entry, TrainableGroup, f"stage.trainable[{i}]")
        lr = default_lr if entry.lr is None else entry.lr
        if lr < 0:
            raise MMError(f"stage.trainable[{i}].lr must be non-negative, got {lr!r}")
        out.append((entry.pattern, float(lr)))
    return out


def apply_stage(model: nn.Module, trainable: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """Freeze all, unfreeze the matches; returns optimizer param groups ``[{"params", "lr", "name"}]``.

    A parameter matched by several globs belongs to the first. A glob matching nothing is an error.
    """
    named = list(model.named_parameters())
    for _, param in named:
        param.requires_grad_(False)
    groups: list[dict[str, Any]] = []
    taken: set[str] = set()
    for pattern, lr in trainable:
        hits = [(name, p) for name, p in named if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            examples = ", ".join(name for name, _ in named[:3])
            raise MMError(f"stage.trainable pattern {pattern!r} matches no parameter (names look like: {examples}, ...)")
        params = []
        for name, param in hits:
            if name not in taken:
                taken.add(name)
                param.requires_grad_(True)
                params.append(param)
        if params:
            groups.append({"params": params, "lr": lr, "name": pattern})
    return groups


def parameter_table(model: nn.Module) -> str:
    """Trainable / frozen parameter counts per top-level part (encoder, adapter, llm, moe) and in total."""
    rows: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        part = name.split(".", 1)[0]
        counts = rows.setdefault(part, [0, 0])
        counts[0 if param.requires_grad else 1] += param.numel()
    total = [sum(c[0] for c in rows.values()), sum(c[1] for c in rows.values())]
    lines = [f"{'part':<10}{'trainable':>15}{'frozen':>15}"]
    for part, (t, f) in list(rows.items()) + [("total", total)]:
        lines.append(f"{part:<10}{t:>15,}{f:>15,}")
    return "\n".join(lines)


def train_mode_where_trained(model: nn.Module, parent_trains: bool = True) -> None:
    """Train mode only where something trains: a submodule whose parameters are all frozen stays in eval mode (a
    frozen tower's BatchNorm statistics never move, a frozen LLM's dropout stays off); a submodule without
    parameters (dropout, activations) follows its parent."""
    parameters = list(model.parameters())
    trains = any(p.requires_grad for p in parameters) if parameters else parent_trains
    model.training = trains
    for child in model.children():
        train_mode_where_trained(child, trains)
