"""``mm train``: train one stage of a multimodal LLM with DeepSpeed (``recipes/train.py`` is the same entry).

    mm train                                                     # quick start: synthetic corpus -> lite align + instruct
    mm train --recipe lite/1_align [more.yaml] key=value ...     # a recipe shipped in the package (or a YAML path)
    mm train --config recipes/lite/1_align.yaml [more.yaml] key=value ...
    deepspeed recipes/train.py --config recipes/lite/3_instruct.yaml output_dir=runs/x trainer.max_steps=2000

Shipped recipes (``recipes/`` in a clone, the package ``mm.recipes`` once installed) train on the synthetic corpus
at ``data/synthetic``, which is generated when a run names it and it is missing. Re-running the same command
resumes from the newest complete checkpoint in ``output_dir``.
Bad input -> one line ``mm: error: ...`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path

from mm.commands.parser import Parser
from mm.errors import MMError, report

DEFAULT_DATA = Path("data/synthetic")  # the corpus the shipped recipes name (mm make-synthetic)
DEFAULT_RUN = Path("runs/default")
# The quick start's stages: (recipe of the family, run folder under DEFAULT_RUN, synthetic documents). Align the
# adapter on captions, then tune the adapter and the LLM on questions, starting from the aligned model.
QUICK_START = (("1_align", "align", "interleaved"), ("3_instruct", "instruct", "chat"))
QUICK_START_QUESTIONS = 200  # held-out questions the quick start answers


def recipe_names() -> list[str]:
    """The shipped recipes as ``family/stage`` (``lite/1_align``)."""
    root = resources.files("mm.recipes")
    return sorted(f"{family.name}/{path.name[:-5]}" for family in root.iterdir() if family.is_dir()
                  for path in family.iterdir() if path.name.endswith(".yaml"))


def resolve_recipe(name: str) -> Path:
    """A YAML path as given, or a shipped recipe's file: ``lite/1_align`` (``.yaml`` optional)."""
    if Path(name).is_file():
        return Path(name)
    stem = name.removesuffix(".yaml")
    if stem in recipe_names():
        family, stage = stem.split("/")
        return Path(str(resources.files("mm.recipes") / family / f"{stage}.yaml"))
    raise MMError(f"no recipe {name!r}: not a file, and the shipped recipes are {', '.join(recipe_names())}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", metavar="NAME", help="a shipped recipe, e.g. lite/1_align or tiny/3_instruct "
                                                         "(families tiny, lite, large), or a YAML path; "
                                                         "--config files merge over it")
    parser.add_argument("--config", nargs="+", default=[], metavar="YAML", help="recipe YAML files, merged in order")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still logged)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume output_dir even though the config changes the model, the trainable set, the "
                             "data or the optimisation (refused otherwise; steps, saving and logging may change)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.max_steps=10")
    parser.set_defaults(run=run)


def add_parser(subparsers) -> None:
    add_arguments(subparsers.add_parser("train", help="train one stage (same as recipes/train.py)",
                                        description=__doc__))


def main(argv: list[str] | None = None) -> int:
    """``recipes/train.py`` (and the ``deepspeed`` launcher running it): parse ``argv`` and train."""
    parser = Parser(prog="recipes/train.py", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv))


def names_synthetic(config) -> bool:
    sources = config.data.train if isinstance(config.data.train, list) else [config.data.train]
    return any(str(source).startswith(f"{DEFAULT_DATA}/") for source in sources if source)


def prepare_synthetic(docs: int = 2000) -> None:
    """Generate ``data/synthetic`` (``docs`` training documents per kind) on rank 0 unless it is there; every rank
    waits for it."""
    import torch.distributed as dist

    from mm.data import make_synthetic

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from mm.train.engine import init_distributed

        init_distributed()
    if int(os.environ.get("RANK", "0")) == 0 and not (DEFAULT_DATA / "manifest.json").is_file():
        print(f"synthetic corpus: generating {DEFAULT_DATA}", flush=True)
        make_synthetic(DEFAULT_DATA, n=docs, progress=True)
    if dist.is_initialized():
        dist.barrier()


def quick_start(progress: bool = True, family: str = "lite", docs: int = 2000, overrides: tuple[str, ...] = ()):
    """No arguments: the synthetic corpus, the lite model aligned on its captions and instruction-tuned on its
    questions, then held-out questions answered and scored beside chance and an image-blind baseline (returned on
    rank 0, None elsewhere). ``family``, ``docs`` and ``overrides`` (for both stages) make a smaller run (tests)."""
    import torch.distributed as dist

    from mm.config import load_config
    from mm.train import TrainConfig, validate
    from mm.train.loop import train

    prepare_synthetic(docs)
    final = None
    for recipe, folder, kind in QUICK_START:
        stage = [f"output_dir={DEFAULT_RUN / folder}", f"data.train={DEFAULT_DATA}/train/{kind}-*.tar"]
        stage += [f"init_from={final}"] if final else []
        config = validate(load_config(TrainConfig, [resolve_recipe(f"{family}/{recipe}")], [*stage, *overrides]))
        final = train(config, progress=progress)
    return answer_demo(final, DEFAULT_DATA, family) if dist.get_rank() == 0 else None


def answer_demo(final: Path, data: Path, family: str = "lite") -> dict:
    """Score ``final`` on held-out synthetic questions; show one image, question, answer and truth; say what next."""
    import mm
    from mm.evaluate.synthetic_qa import synthetic_qa

    result = synthetic_qa(mm.load(final), data, limit=QUICK_START_QUESTIONS)
    types = ", ".join(f"{kind} {accuracy:.2f}" for kind, accuracy in result["per_type"].items())
    print(f"\nheld-out synthetic questions ({result['questions']}, on images not seen in training):\n"
          f"  accuracy {result['accuracy']:.3f}   chance {result['chance']:.3f}   "
          f"image-blind {result['image_blind']:.3f} (the most frequent training answer of each question type)\n"
          f"  per type: {types}")
    example = next(row for row in result["answers"] if row["type"] == "count")
    image = data / "val" / example["image"]
    print(f"\n{image}\n  question: {example['question']}\n  answer:   {' '.join(example['prediction'].split())}\n"
          f"  truth:    {example['answer']}")
    print(f"\nnext:\n"
          f"  ask your own questions:  mm chat --model {final} --image {image}\n"
          f"  web page + OpenAI API:   mm serve --model {final} --ui    (http://127.0.0.1:8000)\n"
          f"  train on your own data:  mm train --recipe {family}/3_instruct init_from={final} "
          f"data.train=DATA.json output_dir=runs/mine\n"
          f"                           (LLaVA JSON, images relative to its folder; or shards, or a dataset named "
          f"in data/datasets.yaml: docs/data.md)\n"
          f"The model knows only synthetic shapes, colours, counts, sides and words: on real photos its answers "
          f"are guesses (README, 'Quick start').")
    return result


def run(args: argparse.Namespace) -> int:
    # ``--config a.yaml key=value``: nargs="+" also takes the overrides that follow the files
    files = [a for a in args.config if "=" not in a]
    overrides = [a for a in args.config if "=" in a] + args.overrides
    try:
        if args.recipe:
            files.insert(0, str(resolve_recipe(args.recipe)))
        if not files and not overrides:
            quick_start(progress=not args.no_progress)
            return 0
        if not files:
            raise MMError("give --config <recipe.yaml> or --recipe NAME (or no arguments at all for the quick start)")
        from mm.config import load_config
        from mm.train import TrainConfig, validate
        from mm.train.loop import train

        config = validate(load_config(TrainConfig, files, overrides))
        if names_synthetic(config):
            prepare_synthetic()
        train(config, progress=not args.no_progress, allow_config_change=args.allow_config_change)
    except MMError as exc:
        return report(exc)
    return 0
