"""A generated, learnable image-text corpus: rendered shapes (kind, colour, count, side) and short words.

Every question is answerable from the image and every answer comes from a small vocabulary, so a tiny model
learns it in minutes. ``scenes`` picks the mix: ``mixed`` (the default: 96 px squares, one scene in five a large
word) or ``wide-words`` (every scene a word in small type at a random place on a 4:1 canvas, 384 x 96: an OCR
check for image layouts, see tools/bench/ocr_layouts.py). Written in all three document kinds, with a held-out
split:

    DIR/train/{interleaved,chat,preference}-NNNNNN.tar
    DIR/val/{interleaved,chat,preference}-NNNNNN.tar
    DIR/val/qa.jsonl + DIR/val/images/*.png   (one question per line: image, question, answer, type)
    DIR/manifest.json                         (parameters, counts, answer vocabulary)
"""
from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from mm.data.shards import ShardWriter

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three", "four")
SIDES = ("left", "right")
WORDS = ("cat", "dog", "sun", "car", "box", "hat", "pen", "cup")
QUESTIONS = {  # question type -> (question, answer vocabulary)
    "color": ("What color are the shapes?", tuple(COLOURS)),
    "shape": ("What shape are they?", SHAPES),
    "count": ("How many shapes are there?", tuple(str(i + 1) for i in range(len(COUNTS)))),
    "side": ("Which side are the shapes on?", SIDES),
    "word": ("What word is written?", WORDS),
}
VERSION = 1
SCENES = ("mixed", "wide-words")
WIDE = (384, 96)  # the wide-words canvas (4:1)
WIDE_FONT = 16  # its type size in pixels: glyphs about 12 px tall, a word about 27 px wide


def random_scene(rng: random.Random, scenes: str = "mixed") -> dict[str, Any]:
    if scenes == "wide-words":
        return {"type": "word", "word": rng.choice(WORDS), "wide": True, "x": rng.random(), "y": rng.random()}
    if rng.random() < 0.2:
        return {"type": "word", "word": rng.choice(WORDS)}
    return {"type": "shapes", "shape": rng.choice(SHAPES), "color": rng.choice(tuple(COLOURS)),
            "count": rng.randint(1, len(COUNTS)), "side": rng.choice(SIDES), "cells": rng.random()}


def draw_scene(scene: dict[str, Any], size: int = 96) -> bytes:
    """PNG bytes of a scene: shapes on a 2 x 4 grid in one half of a white canvas, or a word in black (a wide
    scene: ``WIDE_FONT`` px type, wholly inside a ``WIDE`` canvas at the scene's relative place ``x``, ``y``)."""
    if scene.get("wide"):
        image = Image.new("RGB", WIDE, "white")
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=WIDE_FONT)
        left, top, right, bottom = draw.textbbox((0, 0), scene["word"], font=font)
        x = 2 + scene["x"] * (WIDE[0] - 4 - (right - left)) - left
        y = 2 + scene["y"] * (WIDE[1] - 4 - (bottom - top)) - top
        draw.text((x, y), scene["word"], fill="black", font=font)
        return _png(image)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    if scene["type"] == "word":
        font = ImageFont.load_default(size=size // 3)
        draw.text((size / 2, size / 2), scene["word"], fill="black", font=font, anchor="mm")
    else:
        cell = size // 4
        x0 = 0 if scene["side"] == "left" else size // 2
        cells = [(c, r) for r in range(4) for c in range(2)]
        random.Random(scene["cells"]).shuffle(cells)
        colour, pad = COLOURS[scene["color"]], cell // 6
        for c, r in cells[: scene["count"]]:
            left, top = x0 + c * cell + pad, r * cell + pad
            right, bottom = left + cell - 2 * pad, top + cell - 2 * pad
            if scene["shape"] == "circle":
                draw.ellipse((left, top, right, bottom), fill=colour)
            elif scene["shape"] == "square":
                draw.rectangle((left, top, right, bottom), fill=colour)
            else:
                draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=colour)
    return _png(image)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption(scene: dict[str, Any]) -> str:
    if scene["type"] == "word":
        return f"the word {scene['word']}."
    n = scene["count"]
    return f"{COUNTS[n - 1]} {scene['color']} {scene['shape']}{'s' if n > 1 else ''} on the {scene['side']}."


def answer(scene: dict[str, Any], question: str) -> str:
    return str(scene["count"]) if question == "count" else str(scene[question])


def question_types(scene: dict[str, Any]) -> list[str]:
    return ["word"] if scene["type"] == "word" else ["color", "shape", "count", "side"]


def _image_part() -> dict[str, Any]:
    return {"type": "image", "image": "0.png"}


def interleaved_doc(rng: random.Random, scenes: str = "mixed") -> tuple[dict, list[bytes], list[dict]]:
    drawn = [random_scene(rng, scenes) for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 3))]
    content: list[dict[str, Any]] = []
    for i, scene in enumerate(drawn):
        content += [_image_part(), {"type": "text", "text": (" " if i else "") + caption(scene)}]
    return {"kind": "interleaved", "lang": "en", "content": content}, [draw_scene(s) for s in drawn], drawn


def chat_doc(rng: random.Random, scenes: str = "mixed") -> tuple[dict, list[bytes], list[dict]]:
    scene = random_scene(rng, scenes)
    types = question_types(scene)
    asked = rng.sample(types, k=min(len(types), rng.randint(1, 2)))
    messages = []
    for i, q in enumerate(asked):
        text = {"type": "text", "text": QUESTIONS[q][0]}
        messages.append({"role": "user", "content": [_image_part(), text] if i == 0 else [text]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer(scene, q)}]})
    return {"kind": "chat", "lang": "en", "messages": messages}, [draw_scene(scene)], [scene]


def preference_doc(rng: random.Random, scenes: str = "mixed") -> tuple[dict, list[bytes], list[dict]]:
    scene = random_scene(rng, scenes)
    q = rng.choice(question_types(scene))
    right = answer(scene, q)
    wrong = rng.choice([a for a in QUESTIONS[q][1] if a != right])
    doc = {"kind": "preference", "lang": "en",
           "messages": [{"role": "user", "content": [_image_part(), {"type": "text", "text": QUESTIONS[q][0]}]}],
           "chosen": right, "rejected": wrong}
    return doc, [draw_scene(scene)], [scene]


MAKERS = {"interleaved": interleaved_doc, "chat": chat_doc, "preference": preference_doc}


def make_synthetic(out: str | Path, n: int = 2000, seed: int = 0, n_val: int | None = None,
                   samples_per_shard: int = 1000, overwrite: bool = False, progress: bool = False,
                   scenes: str = "mixed") -> Path:
    """Write the corpus (``n`` train and ``n_val`` held-out documents per kind, ``scenes`` one of ``SCENES``)
    unless ``out`` already holds one made with the same parameters. Returns ``out``."""
    if scenes not in SCENES:
        raise ValueError(f"scenes {scenes!r}: choose one of {', '.join(SCENES)}")
    out = Path(out)
    n_val = max(20, n // 10) if n_val is None else n_val
    params = {"version": VERSION, "n": n, "n_val": n_val, "seed": seed}
    if scenes != "mixed":  # the default corpus keeps the manifest it always had
        params["scenes"] = scenes
    manifest = out / "manifest.json"
    if manifest.exists() and not overwrite:
        if json.loads(manifest.read_text()).get("params") == params:
            return out
    for split in ("train", "val"):
        shutil.rmtree(out / split, ignore_errors=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=3 * (n + n_val), unit="doc", desc="synthetic")
    qa = []
    for split, count in (("train", n), ("val", n_val)):
        for kind, maker in MAKERS.items():
            rng = random.Random(f"{seed}/{split}/{kind}")
            with ShardWriter(out / split, prefix=kind, samples_per_shard=samples_per_shard) as writer:
                for i in range(count):
                    doc, images, drawn = maker(rng, scenes)
                    doc["source"] = {"synthetic": {"seed": seed, "split": split, "index": i}}
                    writer.add(f"{kind}{i:07d}", doc, images)
                    if split == "val" and kind == "chat":
                        name = f"images/{i:05d}.png"
                        (out / "val" / "images").mkdir(parents=True, exist_ok=True)
                        (out / "val" / name).write_bytes(images[0])
                        for q in question_types(drawn[0]):
                            qa.append({"image": name, "question": QUESTIONS[q][0],
                                       "answer": answer(drawn[0], q), "type": q})
                    if bar:
                        bar.update()
    if bar:
        bar.close()
    (out / "val" / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in qa))
    vocabulary = {q: list(v) for q, (_, v) in QUESTIONS.items()}
    manifest.write_text(json.dumps({"params": params, "docs_per_kind": {"train": n, "val": n_val},
                                    "questions": {q: text for q, (text, _) in QUESTIONS.items()},
                                    "answers": vocabulary}, indent=1))
    return out
