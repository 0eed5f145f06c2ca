"""``tools/bench/ocr_layouts.py``'s mechanics on the tiny parts (its accuracy is a benchmark, not a test): both
sides train the same steps, keep their layouts through both stages and report their image costs."""
from __future__ import annotations

import mm
from tools.bench.ocr_layouts import run


def test_both_layouts_train_the_same_steps_and_report_their_costs(tmp_path):
    result = run(family="tiny", n=12, n_val=4, align_steps=1, instruct_steps=1, out=str(tmp_path / "run"),
                 corpus=str(tmp_path / "corpus"), overrides=("data.batch_size=2", "data.seq_len=192"))
    fixed, dynamic = result["fixed"], result["dynamic"]
    assert result["steps"] == {"align": 1, "instruct": 1} and result["image"] == [384, 96]
    assert result["questions"] == 4 and result["chance"] == 0.125
    assert (fixed["layout"], fixed["grid"], fixed["tiles"]) == ("fixed", [1, 1], 1)
    assert (dynamic["layout"], dynamic["grid"], dynamic["tiles"]) == ("dynamic", [4, 1], 5)  # 4 tiles + thumbnail
    tokens = mm.load(tmp_path / "run" / "fixed" / "3_instruct" / "final").tokens_per_image
    assert fixed["tokens_per_image"] == tokens and dynamic["tokens_per_image"] == 5 * tokens + 1  # + one newline
    for side in (fixed, dynamic):
        assert 0 <= side["accuracy"] <= 1 and side["train_s"] >= 0 and side["eval_s"] >= 0  # (0.0 when rounded)
    saved = mm.load(tmp_path / "run" / "dynamic" / "3_instruct" / "final").config.layout
    assert saved.name == "dynamic" and saved.options.max_tiles == 4 and saved.options.thumbnail
