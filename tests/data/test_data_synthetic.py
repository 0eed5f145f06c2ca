"""The synthetic corpus: all kinds and splits, answers agree with the drawn scene, preference pairs, loader use."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import torch

from mm.data import DataConfig, build_loader, iter_docs, make_synthetic
from mm.data.synthetic import COLOURS, QUESTIONS
from mm.images import open_image


def test_corpus_layout_answers_and_idempotence(tmp_path):
    out = make_synthetic(tmp_path / "syn", n=30, seed=1, n_val=10)
    kinds = Counter(d["kind"] for _, d, _ in iter_docs(out / "train"))
    assert kinds == {"interleaved": 30, "chat": 30, "preference": 30}
    assert Counter(d["kind"] for _, d, _ in iter_docs(out / "val")) == {"interleaved": 10, "chat": 10,
                                                                       "preference": 10}
    qa = [json.loads(line) for line in (out / "val" / "qa.jsonl").read_text().splitlines()]
    for row in qa:
        assert row["answer"] in QUESTIONS[row["type"]][1]
        if row["type"] == "color":  # the named colour is really the dominant non-white colour
            array = np.asarray(open_image(out / "val" / row["image"])).reshape(-1, 3)
            pixels = Counter(map(tuple, array.tolist()))
            top = next(c for c, _ in pixels.most_common() if c != (255, 255, 255))
            assert top == COLOURS[row["answer"]]
    for _, doc, _ in iter_docs(out / "train"):
        if doc["kind"] == "preference":
            assert doc["chosen"] != doc["rejected"]
    stamp = (out / "manifest.json").stat().st_mtime_ns
    make_synthetic(tmp_path / "syn", n=30, seed=1, n_val=10)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # same parameters: not regenerated
    other = make_synthetic(tmp_path / "syn2", n=30, seed=2, n_val=10)
    assert [d for _, d, _ in iter_docs(other / "val")] != [d for _, d, _ in iter_docs(out / "val")]


def test_preference_batches_from_the_corpus(tiny_model, tmp_path):
    out = make_synthetic(tmp_path / "syn", n=12, seed=0, n_val=0)
    data = DataConfig(train=str(out / "train"), batch_size=3, seq_len=128, resample=False)
    batches = list(build_loader(data, tiny_model, kind="preference"))
    assert sum(len(b["chosen"]["input_ids"]) for b in batches) == 12
    batch = batches[0]
    chosen, rejected = batch["chosen"], batch["rejected"]
    assert chosen["input_ids"].shape == rejected["input_ids"].shape
    assert torch.equal(chosen["pixel_values"], rejected["pixel_values"])
    for c, r in zip(chosen["input_ids"], rejected["input_ids"]):
        first_diff = int((c != r).nonzero()[0])
        assert first_diff > tiny_model.tokens_per_image  # same prompt (with its image) in both rows
    tok = tiny_model.tokenizer
    answers = [tok.decode([t for t in row.tolist() if t >= 0]) for row in chosen["labels"]]
    assert all(a.endswith("<|im_end|>\n") and len(a) < 30 for a in answers)
    assert "ref_logp_chosen" not in batch
