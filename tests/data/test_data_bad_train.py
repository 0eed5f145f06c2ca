"""Bad and unusable documents through the real training loop (``mm.train.loop.train`` on the tiny align recipe,
DeepSpeed on CPU): a planted bad document is skipped and named, never fatal; a stream that can never yield a batch
ends the run with one line instead of hanging."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm.config import load_config
from mm.data import ShardWriter
from mm.errors import MMError
from mm.train import TrainConfig

from data_helpers import caption_doc, png

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "tiny" / "1_align.yaml"
GOOD = 30


def _overrides(out, shards, *extra) -> list[str]:
    return [f"output_dir={out}", f"data.train={shards}", "data.batch_size=2", "data.seq_len=96",
            "data.shuffle_buffer=8", "trainer.max_steps=4", "trainer.save_every=4", *extra]


def _train(out, shards, *extra) -> Path:
    from mm.train.loop import train

    return train(load_config(TrainConfig, [RECIPE], _overrides(out, shards, *extra)), progress=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """``clean/``: GOOD caption docs; ``planted/``: the same, with the second document holding a literal
    ``<image>`` in its text (two markers, one image), written with the project's ShardWriter."""
    root = tmp_path_factory.mktemp("train-shards")
    for name in ("clean", "planted"):
        with ShardWriter(root / name, "cap", 1000) as writer:
            for i in range(GOOD):
                writer.add(f"cap{i:05d}", caption_doc(f"doc {i} red circle"), [png((i * 40 % 255, 80, 120))])
                if name == "planted" and i == 0:
                    writer.add("planted", caption_doc("a red <image> circle"), [png()])
    return {"clean": root / "clean", "planted": root / "planted"}


def test_training_skips_a_document_with_an_extra_image_marker_and_names_it(shards, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mm.data"):
        final = _train(tmp_path / "run", shards["planted"])
    assert (final / "model.safetensors").is_file()
    named = [r.getMessage() for r in caplog.records if "image_mismatch" in r.getMessage()]
    assert len(named) == 1, named
    assert "document planted of " + str(shards["planted"] / "cap-000000.tar") in named[0]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["bad/image_mismatch"] >= 1 and logged[-1]["data/good"] > 0  # the counts reach the metrics


def test_seq_len_too_small_for_any_document_stops_training_with_why(shards, tmp_path):
    with pytest.raises(MMError, match=r"^no usable document in the last 1000 candidates: 1000 too_long \(e\.g\. "
                                      r"document cap\d+ of .*: \d+ tokens; its first image does not fit in seq_len=8"):
        _train(tmp_path / "run", shards["clean"], "data.seq_len=8")
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow  # a child process: imports and DeepSpeed start again
def test_stage_kind_that_matches_no_document_ends_mm_train_with_one_error_line(shards, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "mm", "train", "--no-progress", "--config", str(RECIPE),
               *_overrides(tmp_path / "run", shards["clean"], "stage.kind=chat")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("mm: error:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert errors == ["mm: error: no usable document in the last 1000 candidates: 1000 kind_mismatch (the run "
                      "reads chat documents, as stage.kind or the loss asks; these were 1000 interleaved)"]
    assert "Traceback" not in done.stderr
