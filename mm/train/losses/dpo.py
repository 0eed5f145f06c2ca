"""Sigmoid DPO on summed response log-probs: ``-log sigmoid(beta * ((pi_w - pi_l) - (ref_w - ref_l)))``.

The reference is a frozen model held outside the engine, or log-probs precomputed into the shards
(``ref_logp_chosen`` / ``ref_logp_rejected`` in the batch; ``tools/precompute_ref_logps.py``). Optional SFT term:
mean token NLL of the chosen answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mm.errors import MMError
from mm.train.losses.base import LOSSES, Loss
from mm.train.losses.forward import sequence_logps


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1) -> torch.Tensor:
    """Per-pair sigmoid DPO loss ``[B]`` from summed log-probs ``[B]`` each."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    return -F.logsigmoid(beta * logits)


def _both(batch, feature_rows_per_image: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows as one batch ``[2B, T]`` (one forward for both); the rejected side's
    ``image_index`` moves past the chosen side's features."""
    chosen, rejected = batch["chosen"], batch["rejected"]
    if chosen["input_ids"].shape[1] != rejected["input_ids"].shape[1]:
        raise MMError("preference batch: chosen and rejected must be padded to the same width")
    both = {k: torch.cat([chosen[k], rejected[k]]) for k in ("input_ids", "labels", "attention_mask", "position_ids")
            if k in chosen}
    if "pixel_values" in chosen:
        both["pixel_values"] = torch.cat([chosen["pixel_values"], rejected["pixel_values"]])
    if "image_index" in chosen:
        shift = len(chosen["pixel_values"]) * feature_rows_per_image
        both["image_index"] = torch.cat([chosen["image_index"], rejected["image_index"] + shift])
    return both


def pair_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed log-probs of chosen ``[B]`` and rejected ``[B]`` and labelled-token counts of chosen ``[B]``."""
    total, count = sequence_logps(model, _both(batch, model.tokens_per_image))
    B = batch["chosen"]["input_ids"].shape[0]
    return total[:B], total[B:], count[:B]


@dataclass
class DPOOptions:
    beta: float = 0.1
    reference: Literal["model", "precomputed"] = "model"  # frozen init_from copy | ref_logp_* in the batch
    sft_weight: float = 0.0  # optional LM term on the chosen answer


class DPOLoss(Loss):
    data_kind = "preference"

    def __init__(self, reference=None, beta: float = 0.1, sft_weight: float = 0.0):
        self.reference = reference.eval().requires_grad_(False) if reference is not None else None
        self.beta, self.sft_weight = beta, sft_weight

    def frozen_models(self) -> dict:
        return {"reference": self.reference} if self.reference is not None else {}

    def __call__(self, model, batch):
        if "chosen" not in batch:
            raise MMError("stage.loss=dpo needs preference data (batches with 'chosen' and 'rejected')")
        pc, pr, count = pair_logps(model, batch)
        if "ref_logp_chosen" in batch:
            rc = batch["ref_logp_chosen"].to(pc)
            rr = batch["ref_logp_rejected"].to(pc)
        elif self.reference is not None:
            with torch.no_grad():
                rc, rr, _ = pair_logps(self.reference, batch)
        else:
            raise MMError("stage.loss.reference=precomputed but the batch carries no ref_logp_chosen/ref_logp_rejected")
        losses = dpo_loss(pc, pr, rc, rr, self.beta)  # [B]
        loss = losses.mean()
        margin = ((pc - pr) - (rc - rr)).detach()
        metrics = {"dpo": loss.detach(), "margin": margin.mean(), "reward_acc": (margin > 0).float().mean()}
        if self.sft_weight:
            sft = -(pc / count.clamp(min=1)).mean()
            loss = loss + self.sft_weight * sft
            metrics["sft"] = sft.detach()
        return loss, metrics


def check_dpo(options: DPOOptions, config) -> None:
    if options.reference == "model" and not config.init_from:
        raise MMError("stage.loss=dpo with reference=model needs init_from (the frozen reference model)")


@LOSSES.register("dpo", options=DPOOptions, check=check_dpo)
def build_dpo(options: DPOOptions, config) -> DPOLoss:
    import mm
    from mm.loading import resolve_model_dir

    reference = mm.load(resolve_model_dir(config.init_from)) if options.reference == "model" else None
    return DPOLoss(reference, options.beta, options.sft_weight)
