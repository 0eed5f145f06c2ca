"""``mm eval``: score a saved model on eval shards (caption: BLEU/CIDEr-D, vqa: VQA accuracy, mc: likelihood)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from itertools import islice
from pathlib import Path

from mm.errors import MMError


def run_eval(args: argparse.Namespace) -> int:
    from mm.commands.model_args import open_model
    from mm.data.bad import BadCounter
    from mm.evaluate.runner import evaluate
    from mm.evaluate.samples import describe_skipped, read_samples

    if args.limit is not None and args.limit < 1:
        raise MMError("--limit must be at least 1")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise MMError("--batch-size and --max-new-tokens must be at least 1")
    out = Path(args.out or f"eval-{args.task}.json")
    if out.is_dir():
        raise MMError(f"--out {out} is a directory; give a file name")
    skipped = BadCounter(keep=None, log=False)  # every skipped document is reported by key, after the run
    samples = read_samples(args.data, args.task, skipped)
    first = next(samples, None)  # fail on a bad --data before loading the model
    if first is None:
        why = describe_skipped(skipped)
        raise MMError(f"no evaluable documents in {args.data}" + (f" ({why})" if why else ""))
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
    _report_skipped(metrics["skipped_documents"])
    if args.json:
        print(json.dumps(metrics))
    else:
        for name, value in metrics.items():
            if name == "skipped_documents":
                continue
            if name == "per_dimension":
                for dim, row in value.items():
                    print(f"  {dim:<24} {row['accuracy']:.4f}  (n={row['n']})")
            else:
                print(f"{name:<12} {value:.4f}" if isinstance(value, float) else f"{name:<12} {value}")
    return 0


def _report_skipped(documents: list[dict], show: int = 20) -> None:
    """One stderr line per skipped document (the first ``show``; all of them are in the metrics JSON)."""
    for row in documents[:show]:
        where = " of ".join(x for x in (row["key"], row["shard"]) if x)
        print(f"mm: skipped {where}: {row['reason']}: {row['detail']}", file=sys.stderr)
    if len(documents) > show:
        print(f"mm: ... and {len(documents) - show} more skipped documents (see \"skipped_documents\" in the "
              "metrics JSON)", file=sys.stderr)


def _chain(first, rest):
    yield first
    yield from rest
