"""TrainConfig: one typed, nested schema for a training run (model, data, stage, trainer, distill, dpo, lora).

Defaults < YAML files < ``key=value`` overrides (``mm.config.load_config``); unknown keys are errors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mm.config import ModelConfig
from mm.data.config import DataConfig
from mm.errors import MMError

LOSSES = ("lm", "distill", "dpo")
KL_KINDS = ("forward", "reverse", "js")
PRECISIONS = ("fp32", "bf16")


@dataclass
class StageConfig:
    """Which parameters train and with which loss. Everything not matched by a glob is frozen.

    ``trainable``: list of ``{pattern: <glob over model parameter names>, lr: <float, optional>}``.
    """

    name: str = "stage"
    trainable: list[dict[str, Any]] = field(default_factory=list)
    loss: str = "lm"  # lm | distill | dpo
    kind: str | None = None  # loader kind handed to mm.data.build_loader (e.g. "preference"); None = auto


@dataclass
class TrainerConfig:
    max_steps: int | None = None  # required
    save_every: int | None = None  # required: optimizer steps between checkpoints
    keep_last: int = 2
    log_every: int = 1
    grad_accum: int = 1
    clip: float = 1.0
    optimizer: str = "adamw"
    lr: float = 1e-4  # default lr of globs that name none
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    zero_stage: int = 0  # 0 | 1 | 2 | 3
    precision: str = "fp32"  # fp32 | bf16
    deepspeed_config: str | None = None  # a user DeepSpeed JSON (replaces the generated one; "auto" values filled)
    compile: bool = False  # torch.compile the LLM's decoder (dynamic shapes); the first steps pay compilation
    seed: int = 0


@dataclass
class DistillConfig:
    """LLaVA-KD: ``loss = lm + mdist_weight * MDist + rdist_weight * RDist`` against a frozen teacher."""

    teacher: str | None = None  # an mm model dir or a run dir (its final export)
    teacher_model: ModelConfig | None = None  # or: build a teacher from a ModelConfig (tests, pretrained parts)
    kl: str = "forward"  # forward | reverse | js
    temperature: float = 1.0
    lm_weight: float = 1.0
    mdist_weight: float = 1.0
    rdist_weight: float = 1.0
    image_positions: bool = True  # MDist also over the image-token positions


@dataclass
class DPOConfig:
    beta: float = 0.1
    reference: str = "model"  # model (frozen init_from copy) | precomputed (ref_logp_* in the batch)
    sft_weight: float = 0.0  # optional LM term on the chosen answer


@dataclass
class LoRAConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainConfig:
    output_dir: str | None = None  # required
    init_from: str | None = None  # a previous run dir (its final export) or an mm model dir
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


def validate(config: TrainConfig, need_data: bool = True) -> TrainConfig:
    """Raise MMError naming the first missing or invalid key."""
    required = {"output_dir": config.output_dir, "trainer.max_steps": config.trainer.max_steps,
                "trainer.save_every": config.trainer.save_every}
    if need_data:
        required["data.train"] = config.data.train
    for key, value in required.items():
        if value in (None, "", []):
            raise MMError(f"missing required config key {key} (set it in a YAML file or as {key}=...)")
    t = config.trainer
    for key in ("max_steps", "save_every", "grad_accum", "keep_last", "log_every"):
        value = getattr(t, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MMError(f"trainer.{key} must be a positive integer, got {value!r}")
    if config.stage.loss not in LOSSES:
        raise MMError(f"stage.loss {config.stage.loss!r} is unknown; choose one of: {', '.join(LOSSES)}")
    if t.precision not in PRECISIONS:
        raise MMError(f"trainer.precision {t.precision!r} is unknown; choose one of: {', '.join(PRECISIONS)}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise MMError(f"trainer.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage!r}")
    if t.compile and t.zero_stage == 3:
        raise MMError("trainer.compile does not work with trainer.zero_stage=3 (ZeRO-3 gathers parameters in "
                      "hooks); use zero_stage 0-2 or compile=false")
    if t.optimizer != "adamw":
        raise MMError(f"trainer.optimizer {t.optimizer!r} is unknown; choose one of: adamw")
    if config.distill.kl not in KL_KINDS:
        raise MMError(f"distill.kl {config.distill.kl!r} is unknown; choose one of: {', '.join(KL_KINDS)}")
    if config.dpo.reference not in ("model", "precomputed"):
        raise MMError(f"dpo.reference {config.dpo.reference!r} is unknown; choose one of: model, precomputed")
    if config.stage.loss == "distill" and not (config.distill.teacher or config.distill.teacher_model):
        raise MMError("stage.loss=distill needs distill.teacher (a model/run dir) or distill.teacher_model")
    if config.stage.loss == "dpo" and config.dpo.reference == "model" and not config.init_from:
        raise MMError("stage.loss=dpo with dpo.reference=model needs init_from (the frozen reference model)")
    if not config.stage.trainable:
        raise MMError("stage.trainable is empty: list at least one {pattern: <glob>, lr: <float>}")
    return config
