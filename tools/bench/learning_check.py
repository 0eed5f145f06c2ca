"""Learning check: train the lite model (efficientnet-lite0 + pool + SmolLM2-135M) with the recipes on the
synthetic corpus, then answer held-out synthetic questions (exact match) and compare with chance and with the
best image-blind answer.

Stages: ``recipes/lite/1_align.yaml`` (adapter on captions), then ``recipes/lite/3_instruct.yaml`` (adapter +
LLM on the chat documents; steps and batch scaled down for CPU). Evaluation:
greedy answers to ``DIR/val/qa.jsonl`` (images never seen in training). Chance = mean over questions of
1 / |answer vocabulary of its type|; image-blind = always the most frequent training answer of the type.

    python -m tools.bench.learning_check [--quick] [--out runs/learning_check] [--align runs/default] [--steps N]
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _norm(text: str) -> str:
    return text.strip().strip(".").strip().lower()


def evaluate(model_dir: Path, corpus: Path, limit: int | None = None) -> dict:
    import mm
    from mm.images import open_image

    model = mm.load(model_dir)
    rows = [json.loads(line) for line in (corpus / "val" / "qa.jsonl").read_text().splitlines()]
    rows = rows[:limit] if limit else rows
    manifest = json.loads((corpus / "manifest.json").read_text())
    vocab = manifest["answers"]
    # image-blind baseline: the most frequent answer per type, from the training chat documents
    from mm.data import iter_docs

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    questions = {text: q for q, text in manifest["questions"].items()}
    for _, doc, _ in iter_docs(str(corpus / "train" / "chat-*.tar")):
        messages = doc["messages"]
        for user, assistant in zip(messages[::2], messages[1::2]):
            text = "".join(p.get("text", "") for p in user["content"] if p.get("type") == "text")
            answer = "".join(p.get("text", "") for p in assistant["content"])
            if text in questions:
                counts[questions[text]][_norm(answer)] += 1
    correct = blind = chance = 0.0
    per_type: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for row in rows:
        image = open_image(corpus / "val" / row["image"])
        answer = model.generate(images=[image], prompt=row["question"], chat=True, max_new_tokens=6)
        hit = _norm(answer) == _norm(row["answer"])
        correct += hit
        per_type[row["type"]][0] += hit
        per_type[row["type"]][1] += 1
        chance += 1 / len(vocab[row["type"]])
        if counts[row["type"]]:
            blind += counts[row["type"]].most_common(1)[0][0] == _norm(row["answer"])
    n = len(rows)
    return {"questions": n, "accuracy": round(correct / n, 3), "chance": round(chance / n, 3),
            "image_blind_majority": round(blind / n, 3),
            "per_type": {t: round(c / m, 3) for t, (c, m) in sorted(per_type.items())}}


def run(quick: bool = False, out: str | None = None, align: str | None = None, steps: int | None = None) -> dict:
    """lite: ``recipes/lite/1_align.yaml`` (or an existing align run) -> ``recipes/lite/3_instruct.yaml``."""
    from mm.config import load_config
    from mm.data import make_synthetic
    from mm.train import TrainConfig
    from mm.train.loop import train

    corpus = make_synthetic(Path(tempfile.gettempdir()) / "mm-learning-check-synthetic", n=2000, n_val=100)
    out = Path(out or tempfile.mkdtemp(prefix="mm-learning-check-"))
    if align is None:
        align_config = load_config(TrainConfig, [ROOT / "recipes" / "lite" / "1_align.yaml"], [
            f"output_dir={out / 'align'}", f"data.train={corpus}/train/interleaved-*.tar", "trainer.keep_last=1"])
        align = str(train(align_config, progress=True).parent)
    steps = steps or (40 if quick else 150)
    config = load_config(TrainConfig, [ROOT / "recipes" / "lite" / "3_instruct.yaml"], [
        f"output_dir={out / 'instruct'}", f"init_from={align}", f"data.train={corpus}/train/chat-*.tar",
        "data.batch_size=8", "data.seq_len=128", f"trainer.max_steps={steps}", f"trainer.save_every={steps}",
        "trainer.warmup_steps=10", "trainer.log_every=10", "trainer.keep_last=1",
        "stage.trainable=[{pattern: 'adapter.*', lr: 1.0e-3}, {pattern: 'llm.*', lr: 5.0e-5}]"])
    final = train(config, progress=True)
    result = evaluate(final, corpus, limit=100 if quick else None)
    result.update(steps={"align": "recipes/lite/1_align.yaml", "instruct": steps}, run=str(out))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="run directory (default: a temp dir)")
    parser.add_argument("--align", help="reuse a finished lite align run (e.g. runs/default) instead of training one")
    parser.add_argument("--steps", type=int, help="instruct steps (default 150, --quick 40)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.out, args.align, args.steps), indent=2))


if __name__ == "__main__":
    main()
