"""Run a model over eval samples in batches: generate (caption, vqa) or score options (mc), then the metrics.

``evaluate`` returns the metrics dict and writes one JSON line per sample to ``predictions`` when given.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import IO, Iterable, Iterator

from tqdm import tqdm

from mm.evaluate.caption_metrics import bleu, cider_d
from mm.evaluate.choice import option_logprobs
from mm.data.bad import BadCounter
from mm.evaluate.samples import EvalSample, describe_skipped
from mm.evaluate.vqa_metrics import vqa_accuracy
from mm.errors import MMError


def _batches(samples: Iterable[EvalSample], size: int) -> Iterator[list[EvalSample]]:
    """Batches of up to ``size`` samples that share one prompt style (chat or plain)."""
    batch: list[EvalSample] = []
    for sample in samples:
        if batch and (len(batch) == size or batch[0].chat != sample.chat):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def evaluate(
    model,
    samples: Iterable[EvalSample],
    task: str,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    mc_score: str = "sum",
    predictions: IO[str] | None = None,
    progress: bool = True,
    skipped: BadCounter | None = None,
) -> dict:
    """Metrics of ``model`` on ``samples`` for ``task`` (caption | vqa | mc). Generation is greedy.
    ``skipped`` (filled by ``read_samples``) goes into the metrics: ``"skipped"`` counts by reason,
    ``"skipped_documents"`` one ``{"key", "shard", "reason", "detail"}`` row per skipped document."""
    if batch_size < 1 or max_new_tokens < 1:
        raise MMError("batch size and max new tokens must be at least 1")
    records: list[dict] = []
    bar = tqdm(desc=f"eval {task}", unit="doc", disable=not progress, dynamic_ncols=True)
    for batch in _batches(samples, batch_size):
        if task == "mc":
            scores = option_logprobs(model, [(s.messages, s.images, s.options) for s in batch],
                                     chat=batch[0].chat, reduce=mc_score)
            for sample, option_scores in zip(batch, scores):
                choice = max(range(len(option_scores)), key=option_scores.__getitem__)
                records.append({"key": sample.key, "dimension": sample.dimension, "scores": option_scores,
                                "prediction": choice, "answer": sample.answer, "correct": choice == sample.answer})
        else:
            outputs = model.generate_batch([(s.messages, s.images) for s in batch], chat=batch[0].chat,
                                           max_new_tokens=max_new_tokens)
            for sample, text in zip(batch, outputs):
                record = {"key": sample.key, "prediction": text.strip(), "references": sample.references}
                if task == "vqa":
                    record["accuracy"] = vqa_accuracy(record["prediction"], sample.references)
                records.append(record)
        if predictions is not None and task == "mc":
            for record in records[-len(batch):]:
                predictions.write(json.dumps(record, ensure_ascii=False) + "\n")
        bar.update(len(batch))
    bar.close()
    if not records:
        why = describe_skipped(skipped) if skipped is not None else ""
        raise MMError("no evaluable documents were read" + (f" ({why})" if why else ""))
    metrics = _metrics(task, records)
    if predictions is not None and task != "mc":  # caption scores need the whole corpus (CIDEr's idf)
        for record in records:
            predictions.write(json.dumps(record, ensure_ascii=False) + "\n")
    skipped = skipped or BadCounter()
    metrics["skipped"] = {**skipped.bad, **skipped.dropped}
    metrics["skipped_documents"] = skipped.documents()
    return metrics


def _metrics(task: str, records: list[dict]) -> dict:
    n = len(records)
    if task == "caption":
        hyps = [r["prediction"] for r in records]
        refs = [r["references"] for r in records]
        b = bleu(hyps, refs)
        cider, per_item = cider_d(hyps, refs)
        for record, score in zip(records, per_item):
            record["cider"] = score
        return {"task": task, "n": n, "bleu1": b[0], "bleu2": b[1], "bleu3": b[2], "bleu4": b[3], "cider": cider}
    if task == "vqa":
        return {"task": task, "n": n, "accuracy": sum(r["accuracy"] for r in records) / n}
    by_dim: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_dim[r["dimension"]].append(r["correct"])
    return {
        "task": task,
        "n": n,
        "accuracy": sum(r["correct"] for r in records) / n,
        "per_dimension": {d: {"accuracy": sum(v) / len(v), "n": len(v)} for d, v in sorted(by_dim.items())},
    }
