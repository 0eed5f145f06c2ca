#!/usr/bin/env python
"""Train one stage of a multimodal LLM with DeepSpeed.

    deepspeed recipes/train.py                                  # embedded default: synthetic corpus -> lite align
    deepspeed recipes/train.py --config recipes/lite/1_align.yaml [more.yaml] key=value ...
    python recipes/train.py --config recipes/tiny/1_align.yaml output_dir=runs/x trainer.max_steps=10

Re-running the same command resumes from the newest complete checkpoint in ``output_dir``.
Bad input -> one line ``mm: error: ...`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parent
DEFAULT_RECIPE = RECIPES / "lite" / "1_align.yaml"
DEFAULT_DATA = Path("data/synthetic")
DEFAULT_RUN = "runs/default"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recipes/train.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", nargs="+", default=[], metavar="YAML", help="recipe YAML files, merged in order")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still logged)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.max_steps=10")
    args = parser.parse_args(argv)
    # ``--config a.yaml key=value``: nargs="+" also takes the overrides that follow the files
    args.overrides = [a for a in args.config if "=" in a] + args.overrides
    args.config = [a for a in args.config if "=" not in a]
    return args


def embedded_default() -> tuple[list[str], list[str], Path]:
    """No arguments: make the synthetic corpus if missing, then align the lite model on its captions."""
    from mm.data import make_synthetic

    import torch.distributed as dist

    rank = int(__import__("os").environ.get("RANK", "0"))
    if rank == 0:
        print(f"synthetic corpus: {DEFAULT_DATA} (generated if missing)", flush=True)
        make_synthetic(DEFAULT_DATA, progress=True)
    if dist.is_initialized():
        dist.barrier()
    return [str(DEFAULT_RECIPE)], [f"output_dir={DEFAULT_RUN}",
                                   f"data.train={DEFAULT_DATA}/train/interleaved-*.tar"], DEFAULT_DATA


def caption_demo(final: Path, data: Path) -> None:
    import mm
    from mm.images import open_image

    images = sorted((data / "val" / "images").glob("*.png"))
    if not images:
        return
    model = mm.load(final)
    text = model.generate(images=[open_image(images[0])], prompt="", chat=False, max_new_tokens=24)
    print(f"\ncaption of held-out {images[0]}: {text.strip()!r}")
    print(f"caption more images with:  mm caption --model {final} <image>")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    from mm.errors import MMError, report

    try:
        from mm.config import load_config
        from mm.train import TrainConfig, validate
        from mm.train.engine import init_distributed

        files, overrides, demo_data = list(args.config), list(args.overrides), None
        if not files and not overrides:
            if int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1:
                init_distributed()
            files, overrides, demo_data = embedded_default()
        elif not files:
            raise MMError("give --config <recipe.yaml> (or no arguments at all for the embedded default)")
        config = validate(load_config(TrainConfig, files, overrides))
        from mm.train.loop import train

        final = train(config, progress=not args.no_progress)
        import torch.distributed as dist

        if demo_data is not None and dist.get_rank() == 0:
            caption_demo(final, demo_data)
    except MMError as exc:
        return report(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
