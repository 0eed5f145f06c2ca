"""TrainConfig: one typed, nested schema for a training run (model, data, stage, trainer, lora).

Defaults < YAML files < ``key=value`` overrides (``mm.config.load_config``); every value is checked against its
annotation and unknown keys are errors. The stage's loss is a registered part with its own options
(``stage.loss: {name: distill, teacher: runs/x, kl: js}``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mm.config import ModelConfig
from mm.data.config import DataConfig, check_data
from mm.errors import MMError
from mm.schema import Part, part_field

# Sections of recipes written before losses owned their options: section -> the loss it configured.
OLD_LOSS_SECTIONS = {"distill": "distill", "dpo": "dpo"}


@dataclass
class TrainableGroup:
    """Parameters whose names match ``pattern`` (a glob over the model's own names) train at ``lr``
    (None: ``trainer.lr``)."""

    pattern: str
    lr: float | None = None


@dataclass
class StageConfig:
    """Which parameters train and with which loss. Everything no ``trainable`` glob matches is frozen.

    ``trainable``: ``{pattern: <glob>, lr: <float>}`` entries, or bare glob strings.
    """

    name: str = "stage"
    trainable: list[TrainableGroup | str] = field(default_factory=list)
    loss: Part = part_field("loss", "lm")  # a registered loss with its options: lm | distill | dpo | ...
    kind: str | None = None  # loader kind handed to mm.data.build_loader (e.g. "preference"); None = the loss's

    def __post_init__(self) -> None:
        from mm.schema import normalise_parts

        normalise_parts(self)
        self.trainable = [TrainableGroup(g) if isinstance(g, str) else g for g in self.trainable]


@dataclass
class EvalTask:
    """An ``mm eval`` task scored on rank 0 whenever the held-out loss is (logged as ``eval/<name>/<metric>``)."""

    task: Literal["caption", "vqa", "mc"]
    data: str  # eval shards, as for ``mm eval --data``
    limit: int = 64  # documents scored each time (the first ones; the same every time)
    batch_size: int = 8
    max_new_tokens: int = 32
    name: str | None = None  # the metrics' prefix (default: the task)


@dataclass
class TrainerConfig:
    max_steps: int | None = None  # required unless epochs is set (then it caps the run)
    save_every: int | None = None  # required: optimizer steps between checkpoints
    keep_last: int = 2
    log_every: int = 1
    grad_accum: int = 1
    clip: float = 1.0
    optimizer: Literal["adamw"] = "adamw"
    lr: float = 1e-4  # default lr of globs that name none
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    deepspeed_config: str | None = None  # a user DeepSpeed JSON (replaces the generated one; "auto" values filled)
    compile: bool = False  # torch.compile the LLM's decoder (dynamic shapes); the first steps pay compilation
    gradient_checkpointing: bool = False  # recompute decoder layers (and a trained tower's blocks) in backward
    seed: int = 0
    epochs: int | None = None  # passes over finite data (data.resample=false); counted up front for the LR schedule
    eval_every: int | None = None  # steps between held-out losses on data.val (None: at the end only)
    eval_batches: int | None = None  # data.val batches per evaluation (None: one whole pass)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    eval_tasks: list[EvalTask] = field(default_factory=list)  # mm eval tasks run with the held-out loss


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
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    @staticmethod
    def migrate(data: dict[str, Any]) -> dict[str, Any]:
        """Old top-level ``distill:`` / ``dpo:`` sections -> the options of ``stage.loss`` they configured
        (dropped when the stage uses another loss, as they were ignored then)."""
        for section, loss in OLD_LOSS_SECTIONS.items():
            if section not in data:
                continue
            options = data.pop(section)
            stage = data.get("stage")
            if not isinstance(stage, dict) or not isinstance(options, dict):
                continue
            current = stage.get("loss", "lm")
            name = current.get("name") if isinstance(current, dict) else current
            if name == loss:
                merged = {**options, **current} if isinstance(current, dict) else {**options, "name": loss}
                data["stage"] = {**stage, "loss": merged}
        return data


def validate(config: TrainConfig, need_data: bool = True) -> TrainConfig:
    """Raise MMError naming the first missing or invalid key (types were checked when the config loaded)."""
    required = {"output_dir": config.output_dir, "trainer.save_every": config.trainer.save_every}
    if config.trainer.epochs is None:
        required["trainer.max_steps"] = config.trainer.max_steps
    if need_data:
        required["data.train"] = config.data.train
    for key, value in required.items():
        if value in (None, "", []):
            hint = " or trainer.epochs" if key == "trainer.max_steps" else ""
            raise MMError(f"missing required config key {key}{hint} (set it in a YAML file or as {key}=...)")
    t = config.trainer
    for key in ("max_steps", "save_every", "grad_accum", "keep_last", "log_every", "epochs", "eval_every",
                "eval_batches"):
        value = getattr(t, key)
        if value is None and key in ("max_steps", "epochs", "eval_every", "eval_batches"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MMError(f"trainer.{key} must be a positive integer, got {value!r}")
    check_data(config.data)
    check_tracking(config, need_data)
    if t.compile and t.zero_stage == 3:
        raise MMError("trainer.compile does not work with trainer.zero_stage=3 (ZeRO-3 gathers parameters in "
                      "hooks); use zero_stage 0-2 or compile=false")
    if not config.stage.trainable:
        raise MMError("stage.trainable is empty: list at least one {pattern: <glob>, lr: <float>}")
    from mm.parts import registry

    check = registry("loss").entry(config.stage.loss.name).extras.get("check")
    if check is not None:
        check(config.stage.loss.options, config)
    return config


def check_tracking(config: TrainConfig, need_data: bool) -> None:
    """trainer.epochs / eval_every / eval_batches / report_to against the data they need."""
    from mm.train.metrics import check_trackers

    t = config.trainer
    if t.epochs is not None:
        if not need_data:
            raise MMError("trainer.epochs counts the passes of data.train's loader; with batches handed to train(), "
                          "set trainer.max_steps instead")
        if config.data.resample:
            raise MMError("trainer.epochs needs finite data: set data.resample=false (or use trainer.max_steps)")
    if t.eval_batches is not None and not config.data.val:
        raise MMError("trainer.eval_batches needs held-out shards: set data.val")
    if t.eval_every is not None and not (config.data.val or t.eval_tasks):
        raise MMError("trainer.eval_every needs something to evaluate: set data.val (held-out shards) or "
                      "trainer.eval_tasks")
    for i, task in enumerate(t.eval_tasks):
        for key in ("limit", "batch_size", "max_new_tokens"):
            if getattr(task, key) < 1:
                raise MMError(f"trainer.eval_tasks[{i}].{key} must be a positive integer, got {getattr(task, key)!r}")
    names = [task.name or task.task for task in t.eval_tasks]
    if len(set(names)) < len(names):
        raise MMError(f"trainer.eval_tasks: two tasks log under the same name ({', '.join(names)}); give each a name")
    if t.eval_tasks and t.zero_stage == 3:
        raise MMError("trainer.eval_tasks generate on rank 0, which ZeRO-3's partitioned weights do not allow; "
                      "use zero_stage 0-2, or data.val's held-out loss")
    check_trackers(t.report_to)  # (missing data.val / eval_tasks shards: mm.train.preflight)
