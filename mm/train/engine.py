"""The DeepSpeed engine of a run: config generated from the recipe (or a user JSON), optimizer over the
trainable parameter groups only, linear warmup + cosine decay.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from mm.errors import MMError
from mm.train.config import TrainConfig


def extensions_dir() -> Path:
    """Where DeepSpeed builds and caches its ops unless ``TORCH_EXTENSIONS_DIR`` is set: one folder per Python
    environment (keyed by ``sys.prefix``) under ``$MM_CACHE`` (default ``~/.cache/mm``), so two environments with
    other torch or CUDA versions neither rebuild each other's ops nor wait on each other's build lock."""
    prefix = Path(sys.prefix).resolve()
    key = hashlib.sha256(str(prefix).encode()).hexdigest()[:12]
    root = Path(os.environ.get("MM_CACHE", Path.home() / ".cache" / "mm"))
    return root / "torch_extensions" / f"{prefix.name.lstrip('.') or 'python'}-{key}"


def init_distributed() -> None:
    """Join (or, without a launcher, create) the process group: gloo on CPU, nccl on GPU."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(29500 + os.getpid() % 1000))):
        os.environ.setdefault(key, value)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON for ``config``; a user file (``trainer.deepspeed_config``) replaces it, with its
    ``"auto"`` values and missing batch keys filled from the recipe."""
    t = config.trainer
    generated = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.clip,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8,
                                                   "weight_decay": t.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not t.deepspeed_config:
        return generated
    path = Path(t.deepspeed_config)
    if not path.is_file():
        raise MMError(f"trainer.deepspeed_config file not found: {path}")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MMError(f"trainer.deepspeed_config {path} is not valid JSON: {exc}") from None
    if user.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise MMError("fp16 needs a GPU; use bf16 or fp32 on CPU")

    def fill(node: dict, ref: dict) -> dict:
        out = {}
        for key, value in node.items():
            if value == "auto":
                if key not in ref:
                    raise MMError(f"deepspeed config key {key!r} is 'auto' but the recipe has no value for it")
                out[key] = ref[key]
            elif isinstance(value, dict):
                out[key] = fill(value, ref.get(key, {}) if isinstance(ref.get(key), dict) else {})
            else:
                out[key] = value
        return out

    merged = fill(user, generated)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer"):
        merged.setdefault(key, generated[key])
    merged.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x world
    return merged


def lr_lambda(warmup_steps: int, max_steps: int, min_ratio: float):
    """Multiplier of each group's lr at optimizer step ``s``: linear warmup, then cosine to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def initialize(module: torch.nn.Module, groups: list[dict[str, Any]], config: TrainConfig):
    """``deepspeed.initialize`` over ``groups`` (trainable parameters only). Returns the engine."""
    import deepspeed

    ds_config = deepspeed_config(config)
    t = config.trainer

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, t.max_steps, t.min_lr_ratio))

    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=[{"params": g["params"], "lr": g["lr"]} for g in groups],
        config=ds_config,
        lr_scheduler=None if "scheduler" in ds_config else scheduler,
    )
    return engine
