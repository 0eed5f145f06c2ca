"""Generation speed: our lite model (timm:tf_efficientnet_lite0 + pool P=7 -> 49 image tokens + SmolLM2-135M)
against transformers' LlavaForConditionalGeneration.generate on the same LLM weights and 49 image tokens
(a small CLIP tower: ViT, 224 px, patch 32 -> 7x7 tokens, width 384, 6 layers).

Measured per call, interleaved (order alternating), each ratio paired within a repeat then the median taken,
fp32, batch 1, greedy, a fixed number of new tokens (no EOS):
first-token latency (call -> first token out, tower included; ``ours_fast`` reuses the key/values of the
constant chat-template prefix kept from the warm-up call, ``ours_fast_no_prefix_reuse`` recomputes them) and decode tokens/s after the first token.
Also: the decode rate as a fraction of the memory-bandwidth limit (LLM weight bytes per token / read bandwidth
measured in the same run), and whether our fast path's tokens equal plain ``generate``'s.

    python -m tools.bench.generate [--quick] [--device cuda] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from tools.bench.stand_in_llm import MARKER
from tools.bench.timing import order, paired_ratio, seconds, synchronizer


class TokenClock:
    """A streamer that timestamps each generated token (puts of one token per row; the prompt put is ignored)."""

    def __init__(self, sync):
        self.times: list[float] = []
        self.sync = sync

    def put(self, value):
        if value.numel() == 1:
            self.sync()
            self.times.append(time.perf_counter())

    def end(self):
        pass


def llm_weights() -> str:
    """``stand-in`` when the cached SmolLM2 directory was written by ``tools.bench.stand_in_llm`` (same config and
    tokenizer, random values: speed does not depend on them), else ``real``."""
    from mm.llm.smollm2 import cache_root

    return "stand-in (random values)" if (cache_root() / "smollm2-135m-instruct" / MARKER).exists() else "real"


def build_lite(device: str):
    import mm

    torch.manual_seed(0)
    config = mm.ModelConfig(encoder="timm:tf_efficientnet_lite0", adapter={"name": "pool", "size": 7},
                            llm="smollm2-135m")
    return mm.build(config).to(device).eval()


def build_peer(ours, device: str):
    """LLaVA with our LLM's weights and a small CLIP tower that yields 49 image tokens."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text_config = ours.llm.config
    vision = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                              image_size=224, patch_size=32)
    image_token = text_config.vocab_size - 1  # an id the prompt never uses
    config = LlavaConfig(vision_config=vision, text_config=text_config, image_token_index=image_token,
                         vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=49,
                         tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False))
    torch.manual_seed(0)
    peer = LlavaForConditionalGeneration(config)
    peer.model.language_model.load_state_dict(ours.llm.model.state_dict())
    peer.lm_head.load_state_dict(ours.llm.lm_head.state_dict())
    peer.generation_config.eos_token_id = None
    return peer.to(device).eval(), image_token


def read_bandwidth(device: str, repeats: int = 7) -> float:
    """Bytes/s of streaming a 512 MiB tensor (larger than any cache) through a reduction."""
    x = torch.ones(128 * 1024 * 1024, device=device)  # 512 MiB fp32
    times = [seconds(x.sum, synchronizer(device)) for _ in range(repeats)]
    del x
    return 128 * 1024 * 1024 * 4 / statistics.median(times)


def llm_weight_bytes(llm) -> int:
    """Bytes read per decode token: every LLM weight once (a tied embedding is read once, as the output head)."""
    seen, total = set(), 0
    for p in llm.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


@torch.no_grad()
def run(quick: bool = False, device: str = "cpu", compile: bool | None = None) -> dict:
    from PIL import Image

    from mm.fast_generate import decoder, greedy_generate

    compile = (not quick) if compile is None else compile
    sync = synchronizer(device)
    new_tokens, repeats = (12, 3) if quick else (40, 7)
    ours = build_lite(device)
    peer, image_token = build_peer(ours, device)
    image = Image.new("RGB", (320, 240), (200, 120, 40))
    conversation = ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
                     "Describe this picture in detail, please."}]}], [image])
    batch = ours.collate([conversation])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pixels = batch["pixel_values"]
    peer_ids = ids.masked_fill(ids == ours.image_token_id, image_token)
    peer_pixels = torch.randn(1, 3, 224, 224, device=device)
    tok = ours.tokenizer

    def peer_call(clock):
        return peer.generate(input_ids=peer_ids, attention_mask=mask, pixel_values=peer_pixels, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=0, streamer=clock, pad_token_id=tok.pad_token_id)

    def plain_call(clock):  # what MultimodalModel.generate_batch does today (transformers generate)
        embeds = ours.embed(ids, pixels)
        with ours.routing(ids == ours.image_token_id):
            return ours.llm.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False,
                                     max_new_tokens=new_tokens, streamer=clock, pad_token_id=tok.pad_token_id,
                                     eos_token_id=None)

    def fast_call(clock):
        return greedy_generate(ours, ids, mask, pixels, max_new_tokens=new_tokens, eos_token_id=None,
                               pad_token_id=tok.pad_token_id, streamer=clock, compile=compile)

    def fast_no_reuse_call(clock):  # the fast path without the shared-prefix key/value reuse
        return greedy_generate(ours, ids, mask, pixels, max_new_tokens=new_tokens, eos_token_id=None,
                               pad_token_id=tok.pad_token_id, streamer=clock, compile=compile, reuse_prefix=False)

    calls = {"peer": peer_call, "ours_plain": plain_call, "ours_fast": fast_call,
             "ours_fast_no_prefix_reuse": fast_no_reuse_call}
    compile_start = time.perf_counter()
    compile_error = None
    if compile:
        try:
            fast_call(None)
        except Exception as exc:  # no compiler here: the eager fast path still gives figures
            compile_error, compile = f"{type(exc).__name__}: {str(exc)[:300]}", False
    outputs = {name: call(None) for name, call in calls.items()}  # warm-up (and compilation)
    warmup_s = time.perf_counter() - compile_start
    plain_tokens = outputs["ours_plain"][0, -new_tokens:].tolist()
    greedy_equal = (outputs["ours_fast"][0].tolist() == plain_tokens
                    and outputs["ours_fast_no_prefix_reuse"][0].tolist() == plain_tokens)
    results = {name: {"first": [], "rate": []} for name in calls}
    bandwidths = []
    for repeat in range(repeats):
        bandwidths.append(read_bandwidth(device, repeats=3))
        for name in order(list(calls), repeat):
            call = calls[name]
            clock = TokenClock(sync)
            sync()
            start = time.perf_counter()
            call(clock)
            times = clock.times
            assert len(times) == new_tokens, (name, len(times))
            results[name]["first"].append(times[0] - start)
            results[name]["rate"].append((len(times) - 1) / (times[-1] - times[0]))
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}

    def paired(numerator: str, denominator: str, key: str) -> float:
        return paired_ratio(results[numerator][key], results[denominator][key])

    bandwidth = statistics.median(bandwidths)
    weight_bytes = llm_weight_bytes(ours.llm)
    limit = bandwidth / weight_bytes
    return {
        "generate_speedup": paired("ours_fast", "peer", "rate"),
        "first_token_speedup": paired("peer", "ours_fast", "first"),
        "first_token_speedup_no_prefix_reuse": paired("peer", "ours_fast_no_prefix_reuse", "first"),
        "prefix_reuse_tokens": len(decoder(ours).prefix.ids),
        "generate_speedup_plain": paired("ours_plain", "peer", "rate"),
        "first_token_speedup_plain": paired("peer", "ours_plain", "first"),
        "decode_tok_s": {name: m["rate"] for name, m in med.items()},
        "first_token_ms": {name: 1000 * m["first"] for name, m in med.items()},
        "decode_bandwidth_fraction": med["ours_fast"]["rate"] / limit,
        "bandwidth_limit_tok_s": limit,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "llm_weight_mb": weight_bytes / 1e6,
        "greedy_equal": greedy_equal,
        "compiled": compile,
        "compile_error": compile_error,
        "llm_weights": llm_weights(),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "image_tokens": ours.tokens_per_image,
        "prompt_tokens": int(ids.shape[1]),
        "warmup_s": warmup_s,
        "device": device,
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, device=args.device, compile=args.compile), indent=2))


if __name__ == "__main__":
    main()
