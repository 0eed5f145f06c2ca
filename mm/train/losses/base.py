"""The loss registry and what every loss provides.

A loss is registered with its options dataclass; its builder gets ``(options, config)`` (the run's
TrainConfig, for ``init_from`` and the seed) and returns a :class:`Loss`. Optional registry extras:
``check(options, config)`` raises MMError on a config the loss cannot run with (called before any model is
built). Adding a loss is one file + one ``@LOSSES.register`` + an import line in ``losses/__init__.py``.
"""
from __future__ import annotations

import torch
from torch import nn

from mm.registry import Registry

LOSSES = Registry("loss")


class Loss:
    """Contract: ``loss(model, batch) -> (scalar loss, {name: detached part})``.

    ``frozen_models()`` declares the frozen models the loss holds (a teacher, a reference): the loop moves
    them to the engine's device and dtype, and they never enter the DeepSpeed engine. ``data_kind`` is the
    loader kind the loss needs when the stage names none (``"preference"`` for DPO).
    """

    data_kind: str | None = None

    def frozen_models(self) -> dict[str, nn.Module]:
        return {}

    def check_student(self, student) -> None:
        """Raise MMError when ``student`` cannot be trained with this loss (before the engine starts)."""

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def auxiliary_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every auxiliary loss the model's parts produced in their last forward, by metric name: each submodule
    with an ``aux_loss()`` method (the top-k MoE balance loss today) contributes ``<path>_aux``. Parts that
    produced none return None and are skipped. The loop adds these to every stage's loss."""
    found = {}
    for path, module in model.named_modules():
        method = getattr(type(module), "aux_loss", None)
        if path and callable(method):
            value = module.aux_loss()
            if value is not None:
                found[f"{path.replace('.', '_')}_aux"] = value
    return found
