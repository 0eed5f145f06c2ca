"""``mm precompute-ref`` and ``mm plot`` on real shards and a real run's metrics."""
from __future__ import annotations

import json
import math

import pytest
import torch

import mm
from mm.cli import main
from mm.commands.precompute_ref import precompute
from mm.data import DataConfig, build_loader
from mm.train.losses import DPOLoss


@pytest.mark.parametrize("layout", ["fixed", {"name": "dynamic", "max_tiles": 4}, {"name": "anyres",
                                                                                 "arrangement": "llava_next"}])
def test_precomputed_ref_logps_give_log2_for_the_reference_policy(layout, corpus, tmp_path):
    """The reference log-probs are those of the training batches, for every layout (tiles, rearranged features)."""
    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(layout=layout))
    model.save(tmp_path / "ref")
    n = precompute(str(tmp_path / "ref"), f"{corpus}/train/preference-*.tar", tmp_path / "out",
                                        seq_len=256, progress=False)
    assert n == 48
    model = mm.load(tmp_path / "ref")
    data = DataConfig(train=str(tmp_path / "out"), batch_size=4, seq_len=256, pack=False, resample=False)
    batch = next(iter(build_loader(data, model, kind="preference")))
    assert "ref_logp_chosen" in batch and batch["ref_logp_chosen"].shape == (4,)
    loss, parts = DPOLoss(None)(model, batch)
    assert abs(float(loss) - math.log(2)) < 1e-4, (float(loss), parts)


def test_plot_metrics_writes_png(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 3 / s, "lm": 3 / s, "lr": 1e-3, "tokens_per_s": 100.0} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(run)]) == 0
    png = (run / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("mm: error: ")
