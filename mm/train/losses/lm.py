"""``lm``: next-token cross-entropy on labelled positions (logits computed only there)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mm.registry import NoOptions
from mm.train.losses.base import LOSSES, Loss
from mm.train.losses.forward import hidden_states, label_positions, logits_at, targets_at


class LMLoss(Loss):
    """``loss = mean token NLL over labels != -100``."""

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = hidden_states(model, batch)  # [B, T, D]
        positions = label_positions(batch["labels"])
        logits = logits_at(model, hidden, positions)  # [N, V]
        loss = F.cross_entropy(logits, targets_at(batch["labels"], positions))
        return loss, {"lm": loss.detach()}


@LOSSES.register("lm", options=NoOptions)
def build_lm(options: NoOptions, config) -> LMLoss:
    return LMLoss()
