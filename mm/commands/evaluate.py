"""``mm eval``: score a saved model on eval shards (caption: BLEU/CIDEr-D, vqa: VQA accuracy, mc: likelihood)."""
from __future__ import annotations

import argparse

from mm.commands.model_args import add_model_flags

TASKS = ("caption", "vqa", "mc")  # mm.evaluate.samples.TASKS (kept here so the parser needs no import of it)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model on caption / VQA / multiple-choice shards",
                                   description=__doc__)
    add_model_flags(parser)
    parser.add_argument("--data", required=True, help="eval shards: a directory of .tar, a glob or brace pattern")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="caption / vqa answer length cap (greedy)")
    parser.add_argument("--mc-score", choices=["sum", "mean"], default="sum",
                        help="mc: summed or mean log-prob of the option tokens")
    parser.add_argument("--out", default=None, help="metrics JSON (default eval-<task>.json); predictions go to "
                        "<out stem>.predictions.jsonl beside it")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mm.evaluate.cli import run_eval
    from mm.train.preflight import writable_file

    writable_file(args.out or f"eval-{args.task}.json", "--out", keep=False)  # before minutes of evaluation
    return run_eval(args)
