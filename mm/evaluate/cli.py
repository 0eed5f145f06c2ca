"""``mm eval``: score a saved model on eval shards (caption: BLEU/CIDEr-D, vqa: VQA accuracy, mc: likelihood)."""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from itertools import islice
from pathlib import Path

from mm.errors import MMError
from mm.evaluate.samples import TASKS


def run_eval(args: argparse.Namespace) -> int:
    from mm.cli import open_model
    from mm.evaluate.runner import evaluate
    from mm.evaluate.samples import read_samples

    if args.limit is not None and args.limit < 1:
        raise MMError("--limit must be at least 1")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise MMError("--batch-size and --max-new-tokens must be at least 1")
    out = Path(args.out or f"eval-{args.task}.json")
    if out.is_dir():
        raise MMError(f"--out {out} is a directory; give a file name")
    skipped: Counter = Counter()
    samples = read_samples(args.data, args.task, skipped)
    first = next(samples, None)  # fail on a bad --data before loading the model
    if first is None:
        raise MMError(f"no evaluable documents in {args.data}" + (f" (skipped: {dict(skipped)})" if skipped else ""))
    model = open_model(args)
    samples = islice(_chain(first, samples), args.limit)
    out.parent.mkdir(parents=True, exist_ok=True)
    predictions_path = out.with_name(out.stem + ".predictions.jsonl")
    tmp = predictions_path.with_name(predictions_path.name + ".tmp")
    with open(tmp, "w") as predictions:
        metrics = evaluate(model, samples, args.task, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           mc_score=args.mc_score, predictions=predictions, progress=not args.no_progress,
                           skipped=skipped)
    os.replace(tmp, predictions_path)
    metrics.update(model=str(args.model), data=str(args.data), predictions=str(predictions_path))
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    if args.json:
        print(json.dumps(metrics))
    else:
        for name, value in metrics.items():
            if name == "per_dimension":
                for dim, row in value.items():
                    print(f"  {dim:<24} {row['accuracy']:.4f}  (n={row['n']})")
            else:
                print(f"{name:<12} {value:.4f}" if isinstance(value, float) else f"{name:<12} {value}")
    return 0


def _chain(first, rest):
    yield first
    yield from rest


def add_eval_command(commands) -> None:
    from mm.cli import add_model_flags

    parser = commands.add_parser("eval", help="evaluate a model on caption / VQA / multiple-choice shards")
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
    parser.set_defaults(run=run_eval)
