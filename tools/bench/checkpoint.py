"""Checkpoint size: bytes written per checkpoint over the bytes of what trains.

``checkpoint_overhead`` = every byte of one ``checkpoints/step-N`` directory, over the bytes of the trainable
weights plus the optimizer's state (AdamW moments, and fp32 master copies where ZeRO keeps them), as the
checkpoint's manifest counts them from the live engine. A checkpoint holds that state plus a few kB of
configuration, so the figure is ~1 (goal <= 1.1); copying the frozen weights (the lite model's full export,
655 MB) into every checkpoint made it ~160.

The lite align recipe (efficientnet-lite0 -> pool adapter -> SmolLM2-135M, adapter trained) runs one step on a
small synthetic corpus, through the real loop, and saves once; ``tiny=True`` runs the tiny recipe instead (tests).
``digest_s`` times the frozen-weight digest resume verifies (mm/train/resume.py) over the student: its cost grows
with the number of frozen tensors (1024 sampled elements each), not with their size.

    python -m tools.bench.checkpoint [--tiny]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from tools.bench.timing import seconds

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def measure(recipe: str, workdir: Path, overrides: list[str] = ()) -> dict:
    """Train ``recipe`` for one step with a checkpoint at that step; the checkpoint's size against its state."""
    from mm.config import load_config
    from mm.data import make_synthetic
    from mm.train import TrainConfig, checkpoints
    from mm.train.build import apply_lora, build_student
    from mm.train.loop import train
    from mm.train.resume import frozen_digest
    from mm.train.stage import apply_stage, parse_trainable

    corpus = make_synthetic(workdir / "corpus", n=48, n_val=4)
    run = workdir / "run"
    config = load_config(TrainConfig, [RECIPES / f"{recipe}.yaml"], [
        f"output_dir={run}", f"data.train={corpus}/train/interleaved-*.tar", "data.shuffle_buffer=8",
        "trainer.max_steps=1", "trainer.save_every=1", *overrides])
    start = time.perf_counter()
    train(config, progress=False)
    took = time.perf_counter() - start
    step, directory = checkpoints.latest(run)
    held = json.loads((directory / checkpoints.MANIFEST).read_text())["bytes"]
    written = directory_bytes(directory)
    student = build_student(config)
    apply_lora(student, config)
    apply_stage(student, parse_trainable(config.stage.trainable, config.trainer.lr))
    digest = frozen_digest(student)
    return {
        "recipe": recipe,
        "checkpoint_bytes": written,
        "trainable_bytes": held["trainable"],
        "optimizer_bytes": held["optimizer"],
        "checkpoint_overhead": round(written / (held["trainable"] + held["optimizer"]), 4),
        "final_export_bytes": directory_bytes(run / "final"),  # the self-contained export, once per run
        "files": sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()),
        "frozen_tensors": digest["tensors"],
        "frozen_bytes": sum(p.numel() * p.element_size() for p in student.parameters() if not p.requires_grad),
        "digest_s": round(min(seconds(lambda: frozen_digest(student)) for _ in range(3)), 4),
        "run_s": round(took, 1),
    }


def run(quick: bool = False, tiny: bool = False) -> dict:
    """The lite align recipe (``tiny``: the tiny one, batch 2 x 96 tokens). ``quick`` changes nothing: one step
    and one save are already the least that measures a checkpoint."""
    with tempfile.TemporaryDirectory(prefix="mm-bench-checkpoint-") as tmp:
        if tiny:
            result = measure("tiny/1_align", Path(tmp), ["data.batch_size=2", "data.seq_len=96"])
        else:
            result = measure("lite/1_align", Path(tmp))
    return {**result, "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny recipe (seconds) instead of lite")
    parser.add_argument("--quick", action="store_true", help="accepted for symmetry; changes nothing")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, tiny=args.tiny), indent=2))


if __name__ == "__main__":
    main()
