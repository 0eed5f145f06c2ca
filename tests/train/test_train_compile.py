"""``trainer.compile``: the compiled decoder trains like the eager one (same losses, same weights, to rounding)."""
from __future__ import annotations

import json

import pytest
import torch

import mm
from mm.errors import MMError
from mm.train import validate

from train_helpers import run, tiny_config


def test_compiled_run_matches_eager(corpus, tmp_path):
    from torch._dynamo.utils import counters

    results, graphs = {}, {}
    for mode in ("eager", "compiled"):
        config = tiny_config("1_align", tmp_path / mode, corpus, f"trainer.compile={mode == 'compiled'}")
        counters.clear()
        model_dir = run(config)
        graphs[mode] = counters["stats"]["unique_graphs"]
        losses = [json.loads(line)["loss"] for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        results[mode] = (losses, mm.load(model_dir).state_dict())
    assert graphs["eager"] == 0 and graphs["compiled"] > 0  # the decoder really ran compiled
    (eager_losses, eager), (compiled_losses, compiled) = results["eager"], results["compiled"]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert all(torch.allclose(eager[name], compiled[name], atol=1e-5) for name in eager)


def test_compile_with_zero3_is_refused(corpus, tmp_path):
    config = tiny_config("1_align", tmp_path / "run", corpus, "trainer.compile=true", "trainer.zero_stage=3")
    with pytest.raises(MMError, match="trainer.compile does not work with trainer.zero_stage=3"):
        validate(config)
