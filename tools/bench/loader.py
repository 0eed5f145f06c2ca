"""Loader throughput and packing efficiency at the lite model's input (224 px, tf_efficientnet_lite0 transform,
SmolLM2 tokenizer, 49 tokens per image with the mlp adapter).

Figures (one process, one worker = in-process iteration, medians over interleaved repeats):
- loader_samples_per_s: documents/s through read + decode + resize/normalise + tokenise + pack + collate;
- packed_efficiency / padded_efficiency: non-pad tokens / all tokens, packing into seq_len rows vs one
  document per row padded to the batch maximum, on a realistic length mix (captions, chats, interleaved);
- packed_vs_padded_speed: loader samples/s with packing relative to padding.

    python -m tools.bench.loader [--quick]
"""
from __future__ import annotations

import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tools.bench.timing import order

WORDS = ("the a red blue green small large circle square shape image shows picture left right top bottom of in "
         "on with and there is are two three many people street car tree house sky water dog cat").split()


def _jpeg(rng: random.Random) -> bytes:
    from PIL import Image, ImageDraw

    w, h = rng.choice([(320, 240), (400, 300), (256, 256), (480, 360)])
    image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(w), rng.randrange(h)
        draw.ellipse((x, y, x + rng.randint(10, 80), y + rng.randint(10, 80)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."


def write_corpus(out: Path, n: int, seed: int = 0) -> None:
    """A realistic mix: 50% captions (5-30 words), 35% chats (1-3 turns, 10-150-word answers),
    15% interleaved docs (2-3 images, 50-300 words)."""
    from mm.data import ShardWriter

    rng = random.Random(seed)
    pool = [_jpeg(rng) for _ in range(24)]
    with ShardWriter(out, "bench", samples_per_shard=200) as writer:
        for i in range(n):
            r = rng.random()
            if r < 0.5:
                doc = {"kind": "interleaved", "content": [{"type": "image", "image": ""},
                                                          {"type": "text", "text": _text(rng, 5, 30)}]}
                images = [rng.choice(pool)]
            elif r < 0.85:
                messages = []
                for turn in range(rng.randint(1, 3)):
                    user = [{"type": "text", "text": _text(rng, 5, 20)}]
                    messages += [{"role": "user", "content": ([{"type": "image", "image": ""}] if turn == 0 else [])
                                  + user}, {"role": "assistant", "content": _text(rng, 10, 150)}]
                doc = {"kind": "chat", "messages": messages}
                images = [rng.choice(pool)]
            else:
                content, images = [], []
                for _ in range(rng.randint(2, 3)):
                    content += [{"type": "image", "image": ""}, {"type": "text", "text": _text(rng, 25, 100)}]
                    images.append(rng.choice(pool))
                doc = {"kind": "interleaved", "content": content}
            doc["lang"] = "en"
            writer.add(f"b{i:06d}", doc, images)


def lite_renderer(seq_len: int):
    """Tokenizer of smollm2-135m (tiny tokenizer if unavailable) + the lite encoder's transform, built without
    loading any weights."""
    from mm.compose import build_encoder
    from mm.config import ModelConfig
    from mm.data import Renderer
    from mm.prompt import add_image_token

    encoder = build_encoder(ModelConfig(encoder="timm:tf_efficientnet_lite0"), pretrained=False)
    try:
        from transformers import AutoTokenizer

        from mm.llm.base import prepare_tokenizer
        from mm.llm.smollm2 import smollm2_dir

        tokenizer, name = prepare_tokenizer(AutoTokenizer.from_pretrained(smollm2_dir())), "smollm2-135m"
    except Exception:  # noqa: BLE001  (benchmark fallback when the packaged LLM is absent)
        from mm.llm.tiny import build_tiny

        tokenizer, name = build_tiny("llama")[1], "tiny-llama"
    renderer = Renderer(tokenizer, add_image_token(tokenizer), encoder.num_tokens, encoder.transform, seq_len)
    return renderer, name, encoder.image_size


def _pass(renderer, shards, pack: bool, seq_len: int, batch_size: int, n: int) -> dict:
    """``n`` documents from a resampled stream (steady state, as in training: no end-of-pass flush)."""
    from mm.data import DataConfig, build_loader

    data = DataConfig(train=str(shards), batch_size=batch_size, seq_len=seq_len, pack=pack, resample=True,
                      shuffle_buffer=64, num_workers=0)
    loader = build_loader(data, renderer)
    pad_id = loader.dataset.pad_id
    real = total = docs = 0
    iterator = iter(loader)
    next(iterator)  # warm-up: the packer's open rows fill first; timing starts in the steady state
    start = time.perf_counter()
    for batch in iterator:
        if pack:
            tokens, count = _packed_counts(batch, pad_id)
        else:
            tokens, count = int(batch["attention_mask"].sum()), len(batch["input_ids"])
        real, total, docs = real + tokens, total + batch["input_ids"].numel(), docs + count
        if docs >= n:
            break
    seconds = time.perf_counter() - start
    return {"samples_per_s": docs / seconds, "efficiency": real / total, "docs": docs}


def _packed_counts(batch, pad_id: int) -> tuple[int, int]:
    """(non-pad tokens, documents) of a packed batch: blocks start where positions restart at 0; a row's last
    block is its padding tail when it holds only pad ids."""
    real = docs = 0
    for ids, positions in zip(batch["input_ids"], batch["position_ids"]):
        starts = (positions == 0).nonzero().flatten().tolist()
        tail_is_pad = bool((ids[starts[-1]:] == pad_id).all())
        real += starts[-1] if tail_is_pad else len(ids)
        docs += len(starts) - tail_is_pad
    return real, docs


def run(quick: bool = False) -> dict:
    import torch

    torch.set_num_threads(1)
    seq_len, batch_size = 2048, 8
    n = 600 if quick else 1500  # documents per measured pass (after the packer's warm-up)
    repeats = 1 if quick else 3
    renderer, tokenizer_name, image_size = lite_renderer(seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(Path(tmp), 200)
        passes: dict[str, list[dict]] = {"packed": [], "padded": []}
        for repeat in range(repeats):  # interleaved repeats, order alternating
            for kind in order(list(passes), repeat):
                passes[kind].append(_pass(renderer, tmp, kind == "packed", seq_len, batch_size, n))
        packed, padded = passes["packed"], passes["padded"]
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {
        "loader_samples_per_s": round(med(packed, "samples_per_s"), 1),
        "padded_loader_samples_per_s": round(med(padded, "samples_per_s"), 1),
        "packed_vs_padded_speed": round(med(packed, "samples_per_s") / med(padded, "samples_per_s"), 3),
        "packed_efficiency": round(med(packed, "efficiency"), 4),
        "padded_efficiency": round(med(padded, "efficiency"), 4),
        "docs": packed[0]["docs"], "seq_len": seq_len, "batch_size": batch_size, "image_size": image_size,
        "tokens_per_image": renderer.tokens_per_image, "tokenizer": tokenizer_name, "workers": 1,
        "repeats": repeats,
    }


def main() -> None:
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))


if __name__ == "__main__":
    main()
