"""OCR learning check of the image layouts: the same model trained twice for the same steps on the ``wide-words``
synthetic corpus (a 3-letter word in 16 px type at a random place on a 384 x 96 canvas, ``mm make-synthetic
--scenes wide-words``), once with the ``fixed`` layout and once with ``dynamic`` tiling, then asked "What word is
written?" about held-out images (exact match) beside chance and the image-blind baseline.

Both sides run in one process, stage by stage (align fixed, align dynamic, instruct fixed, instruct dynamic), with
the same recipes, data order and seeds; only ``model.layout`` differs. The model is the lite one
(efficientnet-lite0 ImageNet + pool + SmolLM2-135M, ``recipes/lite``) unless ``--family tiny`` (random tiny parts:
tests the mechanics only).

    python -m tools.bench.ocr_layouts [--quick] [--out DIR] [--align-steps N] [--instruct-steps N]
                                      [--max-tiles 4] [--no-thumbnail] [--family lite|tiny] [--n 2000]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def layouts(max_tiles: int = 4, thumbnail: bool = True) -> dict[str, list[str]]:
    """The two sides: config overrides of the align stage (the instruct stage inherits the saved layout)."""
    return {"fixed": ["model.layout.name=fixed"],
            "dynamic": ["model.layout.name=dynamic", f"model.layout.max_tiles={max_tiles}",
                        f"model.layout.thumbnail={str(thumbnail).lower()}"]}


def run(quick: bool = False, out: str | None = None, align_steps: int | None = None,
        instruct_steps: int | None = None, max_tiles: int = 4, thumbnail: bool = True, family: str = "lite",
        n: int | None = None, n_val: int | None = None, limit: int | None = None,
        overrides: tuple[str, ...] = (), corpus: str | None = None) -> dict:
    """Train and score both sides; returns ``{"fixed": {...}, "dynamic": {...}, "steps": ..., "corpus": ...}``."""
    import mm
    from mm.commands.train import resolve_recipe
    from mm.config import load_config
    from mm.data import make_synthetic
    from mm.evaluate.synthetic_qa import synthetic_qa
    from mm.images import open_image
    from mm.train import TrainConfig
    from mm.train.loop import train

    n = n or (400 if quick else 2000)
    n_val = n_val if n_val is not None else (40 if quick else 200)
    align_steps = align_steps or (10 if quick else 50)
    instruct_steps = instruct_steps or (20 if quick else 150)
    corpus = make_synthetic(corpus or Path(tempfile.gettempdir()) / f"mm-ocr-layouts-{n}-{n_val}", n=n,
                            n_val=n_val, scenes="wide-words")
    out = Path(out or tempfile.mkdtemp(prefix="mm-ocr-layouts-"))
    sides = layouts(max_tiles, thumbnail)
    common = ["trainer.keep_last=1", *overrides]
    result: dict = {name: {"train_s": 0.0} for name in sides}
    finals: dict[str, Path] = {}
    for stage, steps in (("1_align", align_steps), ("3_instruct", instruct_steps)):
        for name, layout in sides.items():
            kind = "interleaved" if stage == "1_align" else "chat"
            config = load_config(TrainConfig, [resolve_recipe(f"{family}/{stage}")], [
                f"output_dir={out / name / stage}", f"data.train={corpus}/train/{kind}-*.tar",
                f"trainer.max_steps={steps}", f"trainer.save_every={steps}", *common,
                *(layout if stage == "1_align" else [f"init_from={finals[name]}"])])
            start = time.perf_counter()
            finals[name] = train(config, progress=not quick)
            result[name]["train_s"] += time.perf_counter() - start
    image = open_image(next((corpus / "val" / "images").iterdir()))
    for name in sides:
        model = mm.load(finals[name])
        start = time.perf_counter()
        scored = synthetic_qa(model, corpus, limit=limit)
        scored.pop("answers")
        tiled = model.layout_images([image])[0]
        result[name].update(
            accuracy=scored["accuracy"], layout=model.config.layout.name, grid=list(tiled.grid or (1, 1)),
            tiles=tiled.num_images, tokens_per_image=len(model.image_spans([image])[0]),
            eval_s=round(time.perf_counter() - start, 1), train_s=round(result[name]["train_s"], 1))
        result.update(questions=scored["questions"], chance=scored["chance"], image_blind=scored["image_blind"])
    result.update(steps={"align": align_steps, "instruct": instruct_steps}, family=family, corpus=str(corpus),
                  image=list(image.size), run=str(out))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small corpus, 10 align + 20 instruct steps")
    parser.add_argument("--out", help="run directory (default: a temp dir)")
    parser.add_argument("--align-steps", type=int, help="default 50 (--quick 10)")
    parser.add_argument("--instruct-steps", type=int, help="default 150 (--quick 20)")
    parser.add_argument("--max-tiles", type=int, default=4, help="dynamic layout's max_tiles")
    parser.add_argument("--no-thumbnail", action="store_true", help="dynamic layout without the thumbnail tile")
    parser.add_argument("--family", default="lite", choices=("lite", "tiny"), help="recipes/<family>/")
    parser.add_argument("--n", type=int, help="train documents per kind (default 2000, --quick 400)")
    parser.add_argument("--n-val", type=int, help="held-out documents per kind (default 200, --quick 40)")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides of both stages and sides")
    args = parser.parse_args()
    result = run(args.quick, args.out, args.align_steps, args.instruct_steps, args.max_tiles,
                 not args.no_thumbnail, args.family, args.n, args.n_val, overrides=tuple(args.overrides))
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
