"""Learning check: train the lite model (efficientnet-lite0 + pool + SmolLM2-135M) with the shipped recipes on the
synthetic corpus, then answer held-out synthetic questions (exact match) beside chance and the image-blind
baseline (``mm.evaluate.synthetic_qa``, the scoring the quick start prints).

Stages: ``lite/1_align`` (adapter on captions), then ``lite/3_instruct`` (adapter + LLM on the chat documents), as
the quick start (``mm train`` with no arguments) runs them, on a corpus with 100 held-out documents per kind.

    python -m tools.bench.learning_check [--quick] [--out runs/learning_check] [--align runs/default/align]
                                         [--steps N]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def run(quick: bool = False, out: str | None = None, align: str | None = None, steps: int | None = None) -> dict:
    """``lite/1_align`` (or an existing align run) -> ``lite/3_instruct`` (``steps`` overrides its max_steps)."""
    import mm
    from mm.commands.train import resolve_recipe
    from mm.config import load_config
    from mm.data import make_synthetic
    from mm.evaluate.synthetic_qa import synthetic_qa
    from mm.train import TrainConfig
    from mm.train.loop import train

    corpus = make_synthetic(Path(tempfile.gettempdir()) / "mm-learning-check-synthetic", n=2000, n_val=100)
    out = Path(out or tempfile.mkdtemp(prefix="mm-learning-check-"))
    if align is None:
        align_config = load_config(TrainConfig, [resolve_recipe("lite/1_align")], [
            f"output_dir={out / 'align'}", f"data.train={corpus}/train/interleaved-*.tar", "trainer.keep_last=1"])
        align = str(train(align_config, progress=True))
    steps = steps or (40 if quick else None)
    config = load_config(TrainConfig, [resolve_recipe("lite/3_instruct")], [
        f"output_dir={out / 'instruct'}", f"init_from={align}", f"data.train={corpus}/train/chat-*.tar",
        "trainer.keep_last=1", *([f"trainer.max_steps={steps}", f"trainer.save_every={steps}"] if steps else [])])
    final = train(config, progress=True)
    result = synthetic_qa(mm.load(final), corpus, limit=100 if quick else None)
    result.pop("answers")
    result.update(steps={"align": "lite/1_align", "instruct": config.trainer.max_steps}, run=str(out))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="run directory (default: a temp dir)")
    parser.add_argument("--align", help="reuse a finished lite align run (e.g. runs/default/align) instead of training one")
    parser.add_argument("--steps", type=int, help="instruct steps (default: the recipe's; --quick 40)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.out, args.align, args.steps), indent=2))


if __name__ == "__main__":
    main()
