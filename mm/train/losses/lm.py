"""Next-token cross-entropy on labelled positions (logits computed only there), plus any MoE auxiliary loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mm.train.losses.forward import hidden_states, label_positions, logits_at, targets_at


def moe_aux(model) -> torch.Tensor | None:
    return model.moe.aux_loss() if getattr(model, "moe", None) is not None and hasattr(model.moe, "aux_loss") else None


class LMLoss:
    """``loss = mean token NLL over labels != -100`` (+ MoE balance loss for learned routers)."""

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = hidden_states(model, batch)  # [B, T, D]
        positions = label_positions(batch["labels"])
        logits = logits_at(model, hidden, positions)  # [N, V]
        loss = F.cross_entropy(logits, targets_at(batch["labels"], positions))
        metrics = {"lm": loss.detach()}
        aux = moe_aux(model)
        if aux is not None:
            loss = loss + aux
            metrics["moe_aux"] = aux.detach()
        return loss, metrics
