"""Gradient checkpointing: peak memory and time of one 4,096-token full-finetune step, with
``trainer.gradient_checkpointing`` over without.

The step: the lite model (``timm:tf_efficientnet_lite0`` 160 px -> ``pool`` 2x2 -> SmolLM2-135M) with every
weight trained, fp32, one row of 4,096 tokens (one image, its 4 tokens, then text, every text token labelled)
through the real loop's parts: ``build_student``, the stage, the ``lm`` loss and the DeepSpeed engine (ZeRO 0,
AdamW), forward + backward + optimizer step. ``tiny=True``: the tiny recipe's model at 1,024 tokens (tests).

Each variant runs in its own fresh process, so neither sees the other's memory. A 256-token warm-up step first
creates the optimizer state and the gradient buffers; then the measured step. Memory, per variant:
- CUDA: ``torch.cuda.max_memory_allocated`` over the measured step: what PyTorch's allocator held at its peak
  (weights, gradients, optimizer state, activations).
- CPU: the process's peak resident set over the measured step: the high-water mark (``VmHWM``) is reset to the
  current resident set just before it (``/proc/self/clear_refs``) and read after it. glibc's mmap threshold is
  fixed at 64 kB (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go back to the system and the resident set
  follows the live tensors; it also counts the interpreter and libraries (~1 GB), the same for both variants.
``grad_ckpt_memory_ratio`` = peak with / peak without (goal <= 0.6); ``grad_ckpt_activation_ratio`` the same
over the step's rise above the memory held before it; ``grad_ckpt_time_ratio`` = step seconds with / without
(the recomputation's price). Variants alternate between repeats; ratios are medians of per-repeat ratios.

    python -m tools.bench.grad_ckpt [--quick] [--tiny] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tools.bench.timing import order, paired_ratio, seconds, synchronizer

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FULL_FINETUNE = ["model.freeze_encoder=false", "stage.trainable=[encoder.*, adapter.*, llm.*]"]
WARMUP_TOKENS = 256


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _row(model, tokens: int, seed: int) -> dict:
    """One row of ``tokens`` tokens: an image's placeholders then random text, every text token labelled."""
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    image = [model.image_token_id] * model.tokens_per_image
    text = torch.randint(3, len(model.tokenizer) - 1, (tokens - len(image),), generator=generator).tolist()
    text = [t if t != model.image_token_id else 3 for t in text]
    ids = torch.tensor([image + text])  # [1, T]
    pixels = torch.randint(0, 256, (model.encoder.image_size, model.encoder.image_size, 3), generator=generator,
                           dtype=torch.uint8)
    return {"input_ids": ids, "labels": ids.masked_fill(ids == model.image_token_id, -100),
            "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(tokens).unsqueeze(0),
            "pixel_values": model.preprocess([Image.fromarray(pixels.numpy())])}


def measure(recipe: str, tokens: int, checkpointing: bool, device: str) -> dict:
    """One variant, in this (fresh) process: warm-up step, then the measured step (nothing is written)."""
    import tempfile

    import torch

    from mm.config import load_config
    from mm.train import TrainConfig
    from mm.train.build import TrainModule, build_student
    from mm.train.engine import init_distributed, initialize
    from mm.train.losses.lm import LMLoss
    from mm.train.stage import apply_stage, parse_trainable, train_mode_where_trained

    config = load_config(TrainConfig, [RECIPES / f"{recipe}.yaml"], [
        f"output_dir={Path(tempfile.gettempdir()) / 'mm-bench-grad-ckpt'}", "data.batch_size=1", "trainer.max_steps=10",
        f"trainer.gradient_checkpointing={str(checkpointing).lower()}", *FULL_FINETUNE])
    model = build_student(config)
    groups = apply_stage(model, parse_trainable(config.stage.trainable, config.trainer.lr))
    init_distributed()
    engine = initialize(TrainModule(model, LMLoss()), groups, config)
    train_mode_where_trained(engine.module)
    sync = synchronizer(device)

    def step(batch: dict) -> None:
        loss, _ = engine({k: v.to(engine.device) for k, v in batch.items()})
        engine.backward(loss)
        engine.step()

    step(_row(model, WARMUP_TOKENS, seed=0))
    batch = _row(model, tokens, seed=1)
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        took = seconds(lambda: step(batch), sync)
        peak = torch.cuda.max_memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
        before = _status_kb("VmRSS") * 1024
        took = seconds(lambda: step(batch), sync)
        peak = _status_kb("VmHWM") * 1024
    return {"peak_bytes": peak, "before_bytes": before, "step_s": took}


def _child(recipe: str, tokens: int, checkpointing: bool, device: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(RECIPES.parent)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)  # a fresh one-process group of its own
    spec = json.dumps({"recipe": recipe, "tokens": tokens, "checkpointing": checkpointing, "device": device})
    proc = subprocess.run([sys.executable, "-m", "tools.bench.grad_ckpt", "--child", spec], env=env,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"grad_ckpt child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False, device: str = "cpu", tiny: bool = False) -> dict:
    import torch

    recipe, tokens = ("tiny/1_align", 1024) if tiny else ("lite/1_align", 4096)
    repeats = 1 if quick or tiny else 2
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for repeat in range(repeats):
        for checkpointing in order([False, True], repeat):
            runs[checkpointing].append(_child(recipe, tokens, checkpointing, device))

    def gb(values: list[dict], key: str) -> float:
        return round(sorted(v[key] for v in values)[len(values) // 2] / 2**30, 3)

    def rise(r: dict) -> int:
        return max(r["peak_bytes"] - r["before_bytes"], 1)

    plain, ckpt = runs[False], runs[True]
    return {
        "step": f"{recipe} model, full finetune, fp32, 1 x {tokens} tokens, ZeRO 0 AdamW",
        "memory": "torch.cuda.max_memory_allocated" if device.startswith("cuda") else
                  "process peak resident set (VmHWM reset before the step; MALLOC_MMAP_THRESHOLD_=65536)",
        "tokens": tokens,
        "peak_gb_without": gb(plain, "peak_bytes"),
        "peak_gb_with": gb(ckpt, "peak_bytes"),
        "before_step_gb_without": gb(plain, "before_bytes"),
        "before_step_gb_with": gb(ckpt, "before_bytes"),
        "step_s_without": round(sorted(r["step_s"] for r in plain)[len(plain) // 2], 2),
        "step_s_with": round(sorted(r["step_s"] for r in ckpt)[len(ckpt) // 2], 2),
        "grad_ckpt_memory_ratio": round(paired_ratio([r["peak_bytes"] for r in ckpt],
                                                     [r["peak_bytes"] for r in plain]), 3),
        "grad_ckpt_activation_ratio": round(paired_ratio([rise(r) for r in ckpt], [rise(r) for r in plain]), 3),
        "grad_ckpt_time_ratio": round(paired_ratio([r["step_s"] for r in ckpt], [r["step_s"] for r in plain]), 3),
        "repeats": repeats,
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of two")
    parser.add_argument("--tiny", action="store_true", help="the tiny model at 1,024 tokens (seconds)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one variant, in a fresh process
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["recipe"], spec["tokens"], spec["checkpointing"], spec["device"])))
        return
    print(json.dumps(run(quick=args.quick, device=args.device, tiny=args.tiny), indent=2))


if __name__ == "__main__":
    main()
