"""What a run trains: the student (fresh, or ``init_from`` a previous run), LoRA, and the loss of its stage."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

import mm
from mm.config import ModelConfig
from mm.errors import MMError
from mm.loading import resolve_model_dir
from mm.train.config import TrainConfig
from mm.train.losses.base import auxiliary_losses


def build_student(config: TrainConfig):
    """``init_from`` (its saved architecture wins over ``model.*``, but for what a stage may add: modality experts,
    and another image layout; see ``continue_from``) or ``mm.build(config.model)``, made ready to train: every
    pass calls every module (``lockstep``, which ZeRO-3 needs), activation checkpointing when
    ``trainer.gradient_checkpointing``."""
    torch.manual_seed(config.trainer.seed)  # fresh adapters (and tiny towers) initialise identically on every rank
    if config.init_from:
        model = continue_from(mm.load(resolve_model_dir(config.init_from)), config)
    else:
        model = mm.build(config.model)
    model.lockstep = True
    if config.trainer.gradient_checkpointing:
        checkpoint_activations(model)
    return model


def continue_from(model, config: TrainConfig):
    """``init_from``'s model as this stage changes it: modality experts attached when ``model.moe`` asks for them
    and it has none; the image layout replaced when ``model.layout`` is not the default ``fixed`` (a layout holds
    no weights: LLaVA-NeXT aligns at one tile, then tunes on AnyRes grids). Works on the meta device too."""
    if config.model.moe is not None and model.moe is None:
        from mm.moe import attach_experts

        model.config.moe = config.model.moe
        attach_experts(model, config.model.moe)
    layout = config.model.layout
    if layout.name != ModelConfig().layout.name and layout != model.config.layout:
        model.config.layout = layout
        model.layout  # built once now: its options are checked before any weight moves  # noqa: B018
    return model


def checkpoint_activations(model) -> None:
    """Activation (gradient) checkpointing: in a pass with grad enabled, each decoder layer of the LLM keeps only
    its inputs and is recomputed in backward (non-reentrant ``torch.utils.checkpoint``), and so are the blocks of
    a transformers vision tower; a timm or open_clip tower gets its library's own ``set_grad_checkpointing``.

    The layers are the ones transformers declares checkpointable (``GradientCheckpointingLayer``). transformers'
    own switch is not used: it checkpoints only layers in training mode, and a frozen LLM stays in eval mode
    (``train_mode_where_trained``) while gradients still cross it to the adapter, experts or LoRA. Non-reentrant
    checkpointing needs no input that requires grad, and recomputes modality / top-k experts with the routing of
    the forward being differentiated (docs/moe.md). A frozen tower runs under ``no_grad``
    (``MultimodalModel.encode_images``): there is nothing to recompute; a tower without blocks to checkpoint
    (``patch``: one convolution) runs as is."""
    if not checkpoint_layers(model.llm):
        raise MMError(f"trainer.gradient_checkpointing: {type(model.llm).__name__} has no layer transformers "
                      "declares checkpointable (GradientCheckpointingLayer)")
    if checkpoint_layers(model.encoder):
        return
    for module in model.encoder.modules():
        if callable(getattr(module, "set_grad_checkpointing", None)):
            module.set_grad_checkpointing(True)
            return


def checkpoint_layers(module: torch.nn.Module) -> int:
    """Wrap the forward of every ``GradientCheckpointingLayer`` under ``module`` in ``Recomputed``; the count."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        if not isinstance(layer.forward, Recomputed):
            layer.forward = Recomputed(layer.forward)  # an instance attribute: module hooks stay outside
    return len(layers)


class Recomputed:
    """A layer's forward whose activations are recomputed in backward when grad is enabled; a plain call
    otherwise (inference, validation)."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


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


def choose_attention(config: TrainConfig, model) -> None:
    """``data.pack``: set the attention path the LLM runs packed rows with on this run's device and precision
    (mm/llm/attention.py: flash varlen, SDPA per document, or the LLM's own document mask), probed on two packed
    documents, and state it once. MMError when the LLM cannot keep documents apart. Call before ``compile_decoder``."""
    if not config.data.pack:
        return
    import torch.distributed as dist

    from mm.llm.attention import use_packed_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    line = use_packed_attention(model.llm, device, half=config.trainer.precision == "bf16")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, flush=True)


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
