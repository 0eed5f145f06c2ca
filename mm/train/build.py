"""What a run trains: the student (fresh, or ``init_from`` a previous run), LoRA, and the loss of its stage."""
from __future__ import annotations

from pathlib import Path

import torch

import mm
from mm.errors import MMError
from mm.train.config import TrainConfig
from mm.train.losses import DPOLoss, KDLoss, LMLoss


def resolve_model_dir(path: str | Path) -> Path:
    """A run dir (its ``final`` export) or an mm model dir -> the mm model dir."""
    path = Path(path)
    if (path / "mm_config.json").is_file():
        return path
    if (path / "final" / "mm_config.json").is_file():
        return path / "final"
    if not path.exists():
        raise MMError(f"init_from / teacher path not found: {path}")
    raise MMError(f"{path} is neither an mm model dir nor a finished run (no mm_config.json, no final/)")


def build_student(config: TrainConfig):
    """``init_from`` (its saved architecture wins; ``model.*`` is ignored) or ``mm.build(config.model)``."""
    torch.manual_seed(config.trainer.seed)  # fresh adapters (and tiny towers) initialise identically on every rank
    if config.init_from:
        model = mm.load(resolve_model_dir(config.init_from))
        if config.model.moe is not None and model.moe is None:
            from mm.moe import attach_experts

            model.config.moe = config.model.moe
            attach_experts(model, config.model.moe)
        return model
    return mm.build(config.model)


def apply_lora(model, config: TrainConfig) -> None:
    """Wrap ``model.llm`` with PEFT LoRA; adapters appear as ``llm.*lora_A*`` / ``llm.*lora_B*`` parameters."""
    if not config.lora.enabled:
        return
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    names = {name.rsplit(".", 1)[-1] for name, _ in model.llm.named_modules()}
    missing = [m for m in lora.target_modules if m not in names]
    if missing:
        raise MMError(f"lora.target_modules {missing} are not modules of the LLM")
    model.llm = get_peft_model(model.llm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=list(lora.target_modules), bias="none"))


def compile_decoder(model, config: TrainConfig) -> None:
    """``trainer.compile``: torch.compile the LLM's decoder in place, with dynamic shapes (packed rows vary in
    number and width). Inductor fuses the norms, rotary embedding and activations around the matmuls."""
    if config.trainer.compile:
        model.llm.get_decoder().compile(dynamic=True)


def build_teacher(config: TrainConfig):
    d = config.distill
    if d.teacher:
        return mm.load(resolve_model_dir(d.teacher))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.trainer.seed + 1)
        return mm.build(d.teacher_model)


def build_loss(config: TrainConfig, student):
    """The stage's loss object; frozen teacher/reference models live in it, never in the engine."""
    kind = config.stage.loss
    if kind == "lm":
        return LMLoss()
    if kind == "distill":
        d = config.distill
        loss = KDLoss(build_teacher(config), d.kl, d.temperature, d.lm_weight, d.mdist_weight, d.rdist_weight,
                      d.image_positions)
        loss.check(student)
        return loss
    if kind == "dpo":
        reference = mm.load(resolve_model_dir(config.init_from)) if config.dpo.reference == "model" else None
        return DPOLoss(reference, config.dpo.beta, config.dpo.sft_weight)
    raise MMError(f"unknown stage.loss {kind!r}")


def frozen_models(loss) -> list[torch.nn.Module]:
    return [m for m in (getattr(loss, "teacher", None), getattr(loss, "reference", None)) if m is not None]


class TrainModule(torch.nn.Module):
    """What DeepSpeed wraps: the student plus its loss. Frozen teachers are held by the loss, unregistered."""

    def __init__(self, model, loss):
        super().__init__()
        self.model = model
        object.__setattr__(self, "loss_fn", loss)

    def forward(self, batch):
        return self.loss_fn(self.model, batch)
