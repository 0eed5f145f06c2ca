"""Training-step model FLOPs utilisation (MFU) on one GPU: a Qwen2-0.5B-shaped LLM (random weights, 24 layers,
width 896, vocabulary 151936) behind the tiny vision tower, every weight training in bf16 with fused AdamW, through
the training loss every stage uses (``LMLoss``: LM head only at labelled positions), against the bf16 matmul peak
measured in the same run.

    python -m tools.bench.train_gpu [--quick] [--device cuda] [--no-compile]

``mfu`` counts 6 N FLOPs per token (N = LLM parameters, the tied embedding once, as the LM head);
``mfu_with_attention`` adds the attention's 12 * layers * width * seq per token (PaLM's count). The step runs eager
and, unless ``compile=False``, with the decoder under ``torch.compile``; ``mfu`` is the better of the two.
``python -m tools.bench --device cuda`` runs this; ``size="tiny"`` runs the same code on CPU in seconds (tests use
that).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tools.bench.timing import matmul_peak, seconds, synchronizer

SIZES = {  # llm config, batch rows, row length (quick halves both)
    "0.5b": (dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936), 8, 2048),
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024), 2, 64),
}


def build_model(size: str, device: str, dtype: torch.dtype):
    """The tiny tower + MLP adapter + a random Qwen2 LLM of ``size``, all weights trainable, on ``device``."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    import mm
    from mm.compose import assemble, build_encoder
    from mm.llm.tiny import build_tiny

    llm_config = Qwen2Config(**SIZES[size][0], max_position_embeddings=4096, tie_word_embeddings=True)
    config = mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-qwen2", freeze_llm=False,
                            dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype])
    torch.manual_seed(0)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(llm_config, dtype=dtype, attn_implementation="sdpa")
    _, tokenizer = build_tiny("qwen2")
    return assemble(config, build_encoder(config, pretrained=False), llm, tokenizer).to(device).train()


def time_steps(model, batch, device: str, warmup: int, steps: int) -> float:
    """Median seconds of one full step (forward, loss, backward, optimizer) after ``warmup`` steps."""
    from mm.train.losses import LMLoss

    loss_fn = LMLoss()
    fused = device.startswith("cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=fused)

    def step():
        loss, _ = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    return statistics.median(seconds(step, synchronizer(device)) for _ in range(steps))


def run(quick: bool = False, device: str = "cuda", size: str = "0.5b", compile: bool = True) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    # mean of 20 back-to-back products after 3 warm-ups
    peak = matmul_peak(device, dtype, n=8192 if device.startswith("cuda") else 512, batch=20, rounds=1, warmup=3)
    model = build_model(size, device, dtype)
    llm_config = model.llm.config
    rows, seq = SIZES[size][1:]
    if quick:
        rows, seq = max(1, rows // 2), seq // 2
    torch.manual_seed(1)
    ids = torch.randint(10, min(1000, llm_config.vocab_size), (rows, seq), device=device)
    ids[ids == model.image_token_id] = 10 if model.image_token_id != 10 else 11  # placeholders only where put
    ids[:, 1 : 1 + model.tokens_per_image] = model.image_token_id
    batch = {"input_ids": ids, "labels": ids.masked_fill(ids == model.image_token_id, -100),
             "pixel_values": torch.randn(rows, 3, 32, 32, device=device, dtype=dtype)}
    n_params = sum(p.numel() for p in model.llm.parameters())  # tied embedding counted once (as the LM head)
    tokens = rows * seq
    flops = 6 * n_params * tokens
    attention = 12 * llm_config.num_hidden_layers * llm_config.hidden_size * seq * tokens
    warmup, steps = (2, 3) if quick else (3, 10)
    seconds = {"eager": time_steps(model, batch, device, warmup, steps)}
    result = {"llm_params_m": n_params / 1e6, "tokens_per_step": tokens, "rows": rows, "seq": seq,
              "dtype": str(dtype).removeprefix("torch."), f"peak_{'bf16' if dtype == torch.bfloat16 else 'fp32'}_tflops":
              peak / 1e12}
    if compile:
        try:
            model.llm.get_decoder().compile()
            start = time.perf_counter()
            seconds["compiled"] = time_steps(model, batch, device, warmup, steps)
            result["compile_and_run_s"] = time.perf_counter() - start
        except Exception as exc:  # a compiler failure must not lose the eager figure
            result["compile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    best = min(seconds, key=seconds.get)
    result.update({
        "mfu": flops / seconds[best] / peak,
        "mfu_with_attention": (flops + attention) / seconds[best] / peak,
        "best": best,
        "step_s": seconds,
        "mfu_by_mode": {mode: flops / s / peak for mode, s in seconds.items()},
        "tokens_per_s": {mode: tokens / s for mode, s in seconds.items()},
        "flops_count": "6 N per token (all weights train); mfu_with_attention adds 12 * layers * width * seq",
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
    })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="0.5b", choices=sorted(SIZES))
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.device, args.size, args.compile), indent=2))


if __name__ == "__main__":
    main()
