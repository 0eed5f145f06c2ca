"""Packed rows without a T x T mask: one training step over a row of 8 documents against plain causal attention
over the same tokens, and against the dense ``[B, 1, T, T]`` document mask mm used before.

The model: a 4-layer Llama at SmolLM2-135M's widths (hidden 576, 9 query / 3 key-value heads, FFN 1536, vocab
49,152), random weights, fp32 (bf16 on CUDA), every weight trained, wrapped as an mm model and stepped through
the training forward (``hidden_states`` + the ``lm`` loss): forward + backward, no optimizer step. One row of
8,192 tokens = 8 documents of 1,024; the last quarter of each document is labelled (an answer after its prompt).

- ``packed``: positions restart per document, no mask; the attention path ``use_packed_attention`` picks
  (``mm_packed_sdpa`` on CPU: SDPA per document; flash varlen on CUDA where flash-attn is installed);
- ``causal``: the same tokens as one document (positions 0..T-1): plain causal attention, which does more work;
- ``dense``: the same packed row with the dense bool document mask through transformers' SDPA (mm before).

The variants alternate in one process, each repeat in a new order. Time: wall seconds of the step. Memory: on
CUDA ``torch.cuda.max_memory_allocated`` over the step; on CPU the process's peak resident set over the step
(``VmHWM`` reset to the current resident set before it via ``/proc/self/clear_refs``), in a process of its own
with glibc's mmap threshold at 64 kB (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set. It
counts what the process holds anyway (interpreter, weights, gradients), the same for every variant; ``*_rise_*``
report the step's rise above it. ``long_packed_step_ratio`` = packed / causal seconds (goal <= 1.0);
``packed_mask_memory_ratio`` = packed / causal peak (goal <= 1.05). Ratios are medians of per-repeat ratios.

    python -m tools.bench.packing [--quick] [--tiny] [--device cuda]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

from tools.bench.timing import order, paired_ratio, seconds, synchronizer

SMOLLM2_WIDTHS = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True)
TINY_WIDTHS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=1024, tie_word_embeddings=False)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def build(layers: int, widths: dict, width: int, device: str):
    """An mm model around a random Llama of ``widths`` (the tiny-vit encoder is never run: text rows)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import mm
    from mm.compose import assemble, build_encoder
    from mm.llm.tiny import build_tiny

    config = mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama")
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, max_position_embeddings=width, **widths))
    tokenizer = build_tiny("llama")[1]  # a fresh copy: the model adds its image token to it
    model = assemble(config, build_encoder(config, pretrained=False), llm, tokenizer)
    model.requires_grad_(True)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return model.to(device, dtype).train()


def batches(model, width: int, documents: int, device: str) -> dict[str, dict]:
    """The three variants' batches over the same tokens (labels: the last quarter of each document)."""
    import torch

    n = width // documents
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.llm.config.vocab_size, (1, width), generator=generator)
    ids[ids == model.image_token_id] = 3
    labels = ids.clone()
    inside = torch.arange(width) % n  # [T] position inside its document
    labels[:, inside < n - n // 4] = -100
    packed_positions = inside[None]  # [1, T]
    document = torch.arange(width) // n
    mask = (document[:, None] == document[None, :]) & torch.ones(width, width, dtype=torch.bool).tril()
    common = {"input_ids": ids.to(device), "labels": labels.to(device)}
    return {
        "packed": {**common, "position_ids": packed_positions.to(device)},
        "causal": {**common, "position_ids": torch.arange(width, device=device)[None]},
        "dense": {**common, "position_ids": packed_positions.to(device), "attention_mask": mask[None, None].to(device)},
    }


def measure(quick: bool = False, device: str = "cpu", tiny: bool = False) -> dict:
    import torch

    from mm.llm.attention import use_packed_attention
    from mm.train.losses import LMLoss

    layers, widths, width, documents = (2, TINY_WIDTHS, 512, 4) if tiny else (4, SMOLLM2_WIDTHS, 8192, 8)
    repeats = 1 if tiny else (2 if quick else 3)
    model = build(layers, widths, width, device)
    path = use_packed_attention(model.llm, device)
    packed_implementation = model.llm.config._attn_implementation
    rows = batches(model, width, documents, device)
    sync, loss_fn = synchronizer(device), LMLoss()

    def step(name: str) -> None:
        model.llm.set_attn_implementation("sdpa" if name == "dense" else packed_implementation)
        loss, _ = loss_fn(model, rows[name])
        loss.backward()
        model.zero_grad(set_to_none=False)  # gradient buffers stay allocated: the same baseline for every step

    def measured(name: str) -> dict:
        gc.collect()
        sync()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            took = seconds(lambda: step(name), sync)
            peak = torch.cuda.max_memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
            before = _status_kb("VmRSS") * 1024
            took = seconds(lambda: step(name), sync)
            peak = _status_kb("VmHWM") * 1024
        return {"s": took, "peak": peak, "rise": max(peak - before, 1)}

    names = ["packed", "causal", "dense"]
    step("packed")  # warm-up: gradient buffers, allocator, kernels
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in order(names, repeat):
            runs[name].append(measured(name))

    def ratio(a: str, b: str, key: str) -> float:
        return round(paired_ratio([r[key] for r in runs[a]], [r[key] for r in runs[b]]), 3)

    def median(name: str, key: str) -> float:
        values = sorted(r[key] for r in runs[name])
        return values[len(values) // 2]

    return {
        "step": f"{layers}-layer Llama ({widths['hidden_size']} wide), 1 row x {width} tokens = {documents} "
                f"documents, forward + backward, {'bf16' if device.startswith('cuda') else 'fp32'}",
        "attention": path,
        "memory": "torch.cuda.max_memory_allocated" if device.startswith("cuda") else
                  "process peak resident set over the step (VmHWM reset before it; mmap threshold 64 kB)",
        "tokens": width,
        "documents": documents,
        "packed_step_s": round(median("packed", "s"), 3),
        "causal_step_s": round(median("causal", "s"), 3),
        "dense_step_s": round(median("dense", "s"), 3),
        "long_packed_step_ratio": ratio("packed", "causal", "s"),
        "packed_mask_memory_ratio": ratio("packed", "causal", "peak"),
        "dense_step_ratio": ratio("dense", "causal", "s"),
        "dense_memory_ratio": ratio("dense", "causal", "peak"),
        "packed_peak_gb": round(median("packed", "peak") / 2**30, 3),
        "causal_peak_gb": round(median("causal", "peak") / 2**30, 3),
        "dense_peak_gb": round(median("dense", "peak") / 2**30, 3),
        "packed_rise_gb": round(median("packed", "rise") / 2**30, 3),
        "causal_rise_gb": round(median("causal", "rise") / 2**30, 3),
        "dense_rise_gb": round(median("dense", "rise") / 2**30, 3),
        "repeats": repeats,
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device},
    }


def run(quick: bool = False, device: str = "cpu", tiny: bool = False) -> dict:
    """The measurement in a fresh process (glibc's mmap threshold is fixed at its start, and no other benchmark's
    memory is counted); ``tiny``: in this process (tests)."""
    if tiny:
        return measure(quick=quick, device=device, tiny=True)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    spec = json.dumps({"quick": quick, "device": device})
    proc = subprocess.run([sys.executable, "-m", "tools.bench.packing", "--child", spec], env=env,
                          capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"packing child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two repeats instead of three")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama at 512 tokens, one repeat (seconds)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement, its JSON on the last line
        print(json.dumps(measure(**json.loads(args.child))))
        return
    print(json.dumps(run(quick=args.quick, device=args.device, tiny=args.tiny), indent=2))


if __name__ == "__main__":
    main()
