"""What a run trains: the student (fresh, or ``init_from`` a previous run), LoRA, and the loss of its stage."""
from __future__ import annotations

import torch

import mm
from mm.errors import MMError
from mm.loading import resolve_model_dir
from mm.train.config import TrainConfig
from mm.train.losses.base import auxiliary_losses


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


def build_loss(config: TrainConfig):
    """The stage's registered loss, built with its options; frozen models it needs live in it."""
    from mm.parts import registry

    part = config.stage.loss
    return registry("loss").entry(part.name).builder(part.options, config)


def build_checked_loss(config: TrainConfig, student):
    """``build_loss``, then the loss's own check of the student (e.g. the teacher's tokenizer must match)."""
    loss = build_loss(config)
    loss.check_student(student)
    return loss


class TrainModule(torch.nn.Module):
    """What DeepSpeed wraps: the student plus its loss. Frozen teachers are held by the loss, unregistered."""

    def __init__(self, model, loss):
        super().__init__()
        self.model = model
        object.__setattr__(self, "loss_fn", loss)

    def forward(self, batch):
        """The stage's loss plus every auxiliary loss the model's parts produced in this forward."""
        loss, parts = self.loss_fn(self.model, batch)
        for name, aux in auxiliary_losses(self.model).items():
            loss = loss + aux
            parts = {**parts, name: aux.detach()}
        return loss, parts
