"""Training losses: one file per loss, each registered in LOSSES with its options; importing this registers them."""
from mm.train.losses import dpo, kd, lm  # noqa: F401  (registration)
from mm.train.losses.base import LOSSES, Loss, auxiliary_losses
from mm.train.losses.dpo import DPOLoss, DPOOptions, dpo_loss
from mm.train.losses.forward import hidden_states, label_positions, sequence_logps
from mm.train.losses.kd import DistillOptions, KDLoss, kl_divergence, mdist, rdist
from mm.train.losses.lm import LMLoss

__all__ = ["LOSSES", "Loss", "auxiliary_losses", "LMLoss", "KDLoss", "DPOLoss", "DistillOptions", "DPOOptions",
           "dpo_loss", "kl_divergence", "mdist", "rdist", "hidden_states", "label_positions", "sequence_logps"]
