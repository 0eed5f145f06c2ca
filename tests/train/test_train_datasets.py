"""``mm train`` on a user's LLaVA JSON + image folder, named in data/datasets.yaml: converted on the fly, trained
through the real engine (an align stage on chat documents), and the run's saved config keeps the name (so a resume finds the same data)."""
from __future__ import annotations

import json

import yaml

from mm.data import iter_docs

from train_helpers import run, tiny_config


def test_instruct_trains_on_a_named_llava_dataset(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MM_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MM_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "photos"
    images.mkdir()
    records = []
    for i, (key, doc, pictures) in enumerate(iter_docs(f"{corpus}/train/chat-*.tar")):
        (images / f"{key}.png").write_bytes(pictures[0])
        turns = [{"from": "human" if m["role"] == "user" else "gpt",
                  "value": "".join("<image>\n" if p["type"] == "image" else p["text"] for p in m["content"])}
                 for m in doc["messages"]]
        records.append({"id": key, "image": f"{key}.png", "conversations": turns})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.json").write_text(json.dumps(records))
    (tmp_path / "data" / "datasets.yaml").write_text(f"mine:\n  llava: mine.json\n  images: {images}\n")

    final = run(tiny_config("1_align", tmp_path / "run", corpus, "data.train=mine", "stage.kind=chat"))
    assert (final / "mm_config.json").is_file()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["train"] == "mine"
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]
    (cached,) = (tmp_path / "cache").glob("mine-*/stats.json")
    assert json.loads(cached.read_text())["written"] == len(records)
