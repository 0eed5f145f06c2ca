"""Training losses: one per stage kind, each ``(model, batch) -> (loss, metrics)``; see ``build_loss``."""
from mm.train.losses.dpo import DPOLoss, dpo_loss
from mm.train.losses.forward import hidden_states, label_positions, sequence_logps
from mm.train.losses.kd import KDLoss, kl_divergence, mdist, rdist
from mm.train.losses.lm import LMLoss

__all__ = ["LMLoss", "KDLoss", "DPOLoss", "dpo_loss", "kl_divergence", "mdist", "rdist", "hidden_states",
           "label_positions", "sequence_logps"]
