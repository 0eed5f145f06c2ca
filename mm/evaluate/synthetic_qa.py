"""Held-out accuracy on the synthetic corpus's questions (``mm make-synthetic``), beside the two baselines that say
whether a model reads the image: chance (uniform over each question type's answers) and image-blind (always the
most frequent training answer of the question's type, the best a model that ignores the image can do).

    result = synthetic_qa(model, "data/synthetic")
    # {"questions": 352, "accuracy": 0.93, "chance": 0.32, "image_blind": 0.30, "per_type": {...}, "answers": [...]}

Questions are ``DIR/val/qa.jsonl`` (images never seen in training); an answer is right when it equals the truth
after lower-casing and stripping spaces and a final full stop.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path


def normalize(text: str) -> str:
    return text.strip().strip(".").strip().lower()


def questions(corpus: str | Path) -> list[dict]:
    """The held-out questions: ``{"image": "images/00000.png", "question", "answer", "type"}`` per line."""
    path = Path(corpus) / "val" / "qa.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def majority_answers(corpus: str | Path) -> dict[str, str]:
    """Question type -> its most frequent answer in the training chat documents (the image-blind baseline)."""
    from mm.data import iter_docs

    corpus = Path(corpus)
    types = {text: kind for kind, text in json.loads((corpus / "manifest.json").read_text())["questions"].items()}
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for _, doc, _ in iter_docs(str(corpus / "train" / "chat-*.tar")):
        messages = doc["messages"]
        for user, assistant in zip(messages[::2], messages[1::2]):
            text = "".join(p.get("text", "") for p in user["content"] if p.get("type") == "text")
            if text in types:
                counts[types[text]][normalize("".join(p.get("text", "") for p in assistant["content"]))] += 1
    return {kind: counter.most_common(1)[0][0] for kind, counter in counts.items()}


def synthetic_qa(model, corpus: str | Path, limit: int | None = None, batch_size: int = 16) -> dict:
    """Greedy answers of ``model`` (an ``mm.MultimodalModel``) to the held-out questions, scored.

    ``answers`` lists every question with the model's answer (``prediction``) and whether it was right.
    """
    from mm.images import open_image
    from mm.prompt import user_message

    corpus = Path(corpus)
    rows = questions(corpus)[:limit] if limit else questions(corpus)
    if not rows:
        raise ValueError(f"{corpus / 'val' / 'qa.jsonl'} holds no questions")
    vocabulary = json.loads((corpus / "manifest.json").read_text())["answers"]
    majority = majority_answers(corpus)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        conversations = [([user_message(row["question"], 1)], [open_image(corpus / "val" / row["image"])])
                         for row in chunk]
        for row, prediction in zip(chunk, model.generate_batch(conversations, max_new_tokens=6)):
            row["prediction"] = prediction.strip()
            row["correct"] = normalize(prediction) == normalize(row["answer"])
    per_type: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for row in rows:
        per_type[row["type"]][0] += row["correct"]
        per_type[row["type"]][1] += 1
    n = len(rows)
    return {
        "questions": n,
        "accuracy": round(sum(row["correct"] for row in rows) / n, 3),
        "chance": round(sum(1 / len(vocabulary[row["type"]]) for row in rows) / n, 3),
        "image_blind": round(sum(majority.get(row["type"]) == normalize(row["answer"]) for row in rows) / n, 3),
        "per_type": {kind: round(right / total, 3) for kind, (right, total) in sorted(per_type.items())},
        "answers": rows,
    }
