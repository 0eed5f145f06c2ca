"""Modality experts: cost of routing, and the monolithic model's first-token latency.

1. Forward time of SmolLM2-135M with a visual FFN expert on every layer (static modality routing by
   gather/scatter) against the plain LLM, on the same mixed sequence (64 text + 256 image + 64 text
   embeddings, batch 1). Goal <= 1.15x: each token runs through one FFN, never both.
2. First-token latency (PIL image + prompt -> first generated token, preprocessing and vision included) of the
   monolithic Mono-InternVL-style model (``patch`` at 196 px -> 14x14 -> ``pixel-shuffle`` -> 49 tokens,
   SmolLM2 with FFN experts on all layers) against the modular lite model (``timm:tf_efficientnet_lite0`` ->
   ``pool`` 7x7 = 49 tokens, SmolLM2) at the same number of image tokens.

Interleaved repeats (order alternating), medians, fp32, greedy. Ratios only: the machine's speed drifts.

    python -m tools.bench.moe [--quick] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from tools.bench.timing import interleaved, medians, synchronizer

PROMPT = "Describe the image in one sentence."


def bench_forward(repeats: int, device: str) -> dict:
    import mm
    from mm.compose import build_llm

    plain_llm, _ = build_llm(mm.ModelConfig(llm="smollm2-135m"))
    plain_llm = plain_llm.to(device).eval()
    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder={"name": "patch:64", "image_size": 448}, adapter="pixel-shuffle",
                                    llm="smollm2-135m", moe=mm.MoEConfig(ffn_experts=True, layers="all")))
    model = model.to(device).eval()
    width = plain_llm.config.hidden_size
    embeddings = torch.randn(1, 64 + 256 + 64, width, device=device) * 0.02  # [1, T, D]
    image_mask = torch.zeros(1, embeddings.shape[1], dtype=torch.bool, device=device)
    image_mask[:, 64:320] = True

    def plain():
        plain_llm(inputs_embeds=embeddings, use_cache=False)

    def experts():
        with model.routing(image_mask):
            model.llm(inputs_embeds=embeddings, use_cache=False)

    with torch.no_grad():
        with model.routing(image_mask):  # copied experts: the routed model reproduces the plain LLM
            routed = model.llm(inputs_embeds=embeddings, use_cache=False).logits
        reference = plain_llm(inputs_embeds=embeddings, use_cache=False).logits
        # BLAS may round a row differently when the GEMM has fewer rows (K=1536: ~1 ulp per matmul)
        diff = float((routed[..., :reference.shape[-1]] - reference).abs().max())
        calls, sync = {"plain": plain, "experts": experts}, synchronizer(device)
        interleaved(calls, 2, sync)  # warm-up
        median = medians(interleaved(calls, repeats, sync))
    return {
        "sequence": "64 text + 256 image + 64 text tokens, batch 1",
        "plain_forward_s": round(median["plain"], 4),
        "experts_forward_s": round(median["experts"], 4),
        "experts_vs_plain": round(median["experts"] / median["plain"], 3),
        "max_abs_logit_diff_vs_plain": diff,
        "expert_params_m": round(sum(p.numel() for p in model.moe.parameters()) / 1e6, 1),
    }


def bench_first_token(repeats: int, device: str) -> dict:
    import mm
    from PIL import Image

    torch.manual_seed(0)
    mono = mm.build(mm.ModelConfig(encoder={"name": "patch", "image_size": 196}, adapter="pixel-shuffle",
                                   llm="smollm2-135m", moe=mm.MoEConfig(ffn_experts=True, layers="all")))
    mono = mono.to(device).eval()
    torch.manual_seed(0)
    lite = mm.build(mm.ModelConfig(encoder="timm:tf_efficientnet_lite0", adapter={"name": "pool", "size": 7},
                                   llm="smollm2-135m")).to(device).eval()
    assert mono.tokens_per_image == lite.tokens_per_image == 49
    generator = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (320, 400, 3), generator=generator, dtype=torch.uint8).numpy())

    def first_token(model):
        return lambda: model.generate(images=[image], prompt=PROMPT, max_new_tokens=1)

    calls = {"monolithic": first_token(mono), "lite": first_token(lite)}
    sync = synchronizer(device)
    interleaved(calls, 2, sync)  # warm-up
    median = medians(interleaved(calls, repeats, sync))

    def vision_params(model):
        return sum(p.numel() for p in [*model.encoder.parameters(), *model.adapter.parameters()]) / 1e6

    return {
        "image_tokens": 49,
        "monolithic_first_token_s": round(median["monolithic"], 4),
        "lite_first_token_s": round(median["lite"], 4),
        "monolithic_vs_lite": round(median["monolithic"] / median["lite"], 3),
        "monolithic_vision_params_m": round(vision_params(mono), 2),
        "lite_vision_params_m": round(vision_params(lite), 2),
    }


def run(quick: bool = False, device: str = "cpu") -> dict:
    repeats = 5 if quick else 15
    return {
        "forward": bench_forward(repeats, device),
        "first_token": bench_first_token(repeats, device),
        "repeats": repeats,
        "device": device,
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, device=args.device), indent=2))


if __name__ == "__main__":
    main()
