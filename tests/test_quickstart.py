"""The quick start (``mm train`` with no arguments) on the tiny model: corpus generated, align then instruct chained,
held-out questions scored beside the baselines, one example and the next commands printed."""
from __future__ import annotations

import json
import re

import yaml

from mm.commands.train import DEFAULT_DATA, DEFAULT_RUN, quick_start
from mm.evaluate.synthetic_qa import majority_answers, normalize, questions


def test_quick_start_trains_both_stages_and_answers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the quick start writes data/synthetic and runs/default where it runs
    steps = ("trainer.max_steps=4", "trainer.save_every=4", "data.batch_size=2")
    result = quick_start(progress=False, family="tiny", docs=40, overrides=steps)
    out = capsys.readouterr().out

    assert (DEFAULT_DATA / "manifest.json").is_file()  # generated, since it was missing
    align, instruct = DEFAULT_RUN / "align", DEFAULT_RUN / "instruct"
    assert (align / "final" / "mm_config.json").is_file() and (instruct / "final" / "mm_config.json").is_file()
    assert yaml.safe_load((instruct / "config.yaml").read_text())["init_from"] == str(align / "final")

    rows = questions(DEFAULT_DATA)
    assert result["questions"] == len(rows) == len(result["answers"]) > 0
    assert all(row["correct"] == (normalize(row["prediction"]) == normalize(row["answer"])) for row in result["answers"])
    assert result["accuracy"] == round(sum(row["correct"] for row in result["answers"]) / len(rows), 3)
    vocabulary = json.loads((DEFAULT_DATA / "manifest.json").read_text())["answers"]
    assert result["chance"] == round(sum(1 / len(vocabulary[row["type"]]) for row in rows) / len(rows), 3)
    majority = majority_answers(DEFAULT_DATA)
    assert result["image_blind"] == round(sum(majority[row["type"]] == row["answer"] for row in rows) / len(rows), 3)

    line = f"accuracy {result['accuracy']:.3f}   chance {result['chance']:.3f}   image-blind {result['image_blind']:.3f}"
    assert line in out
    example = re.search(r"\n(\S+\.png)\n  question: (.+)\n  answer:   (.*)\n  truth:    (.+)\n", out)
    assert example and (tmp_path / example.group(1)).is_file()
    assert any(f"images/{row['image'].split('/')[-1]}" in example.group(1) and row["question"] == example.group(2)
               and " ".join(row["prediction"].split()) == example.group(3) and row["answer"] == example.group(4)
               for row in result["answers"])
    for command in (f"mm chat --model {instruct / 'final'} --image {example.group(1)}",
                    f"mm serve --model {instruct / 'final'} --ui",
                    f"mm train --recipe tiny/3_instruct init_from={instruct / 'final'} data.train=DATA.json"):
        assert command in out
