"""Helpers of the training tests: tiny recipe configs, in-process runs, child-process environments."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mm.config import load_config
from mm.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "mm" / "torch_extensions"))


def tiny_config(recipe: str, out: Path, corpus: Path, *overrides: str) -> TrainConfig:
    kind = load_config(TrainConfig, [TINY / f"{recipe}.yaml"]).stage.kind or "interleaved"
    files = {"interleaved": "interleaved", "chat": "chat", "preference": "preference", "lm": "*"}[kind]
    return load_config(TrainConfig, [TINY / f"{recipe}.yaml"], [
        f"output_dir={out}", f"data.train={corpus}/train/{files}-*.tar", "data.batch_size=2", "data.seq_len=96",
        "data.shuffle_buffer=8", "trainer.max_steps=2", "trainer.save_every=2", *overrides])


def run(config: TrainConfig, batches=None) -> Path:
    from mm.train.loop import train

    return train(config, batches=batches, progress=False)


def subprocess_env() -> dict[str, str]:
    """Environment for child training processes: no distributed variables inherited from this process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ (bit for bit)."""
    return [k for k in a if not torch.equal(a[k], b[k])]
