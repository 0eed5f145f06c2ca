"""Tracking and validation through the real DeepSpeed loop: the held-out loss (``data.val``, ``eval_every``) in
metrics.jsonl and TensorBoard, ``grad_norm`` on every logged step (ours without ZeRO equals DeepSpeed's under
ZeRO-2), ``trainer.epochs`` stopping after N passes with the LR schedule spanning them, ``report_to`` mlflow to a
local file store, the one-line refusal of a tracker that is not installed, and ``mm plot``'s panels."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from itertools import islice

import pytest
import torch

import mm
from mm.commands.plot import panels, plot
from mm.config import load_config
from mm.data import build_loader
from mm.errors import MMError
from mm.train import TrainConfig
from mm.train.build import TrainModule, build_checked_loss
from mm.train.config import validate
from mm.train.engine import lr_lambda
from mm.train.epochs import epoch_batches, pass_data

from train_helpers import ROOT, TINY, run, subprocess_env, tiny_config


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(corpus, tmp_path_factory):
    """A tiny align run: 4 steps, the held-out loss every 2 steps on 2 val batches, and a vqa task on 4 documents."""
    out = tmp_path_factory.mktemp("tracking") / "run"
    config = tiny_config("1_align", out, corpus, "trainer.max_steps=4", "trainer.save_every=4",
                         f"data.val={corpus}/val/interleaved-*.tar", "trainer.eval_every=2", "trainer.eval_batches=2",
                         f"trainer.eval_tasks=[{{task: vqa, data: '{corpus}/val/chat-*.tar', limit: 4, "
                         "max_new_tokens: 4}]")
    return config, run(config)


def test_eval_loss_in_jsonl_and_tensorboard(evaluated):
    config, final = evaluated
    out = final.parent
    lines = rows(out)
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
    for r in train_lines:  # grad_norm on every logged step of a CPU (ZeRO-0) run, where DeepSpeed gives none
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0, r
    evals = [r for r in lines if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(math.isfinite(r["eval/loss"]) and not ({"loss", "lr"} & set(r)) for r in evals)
    assert all(0 <= r["eval/vqa/accuracy"] <= 1 for r in evals)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss",
            "eval/vqa/accuracy"} <= set(tags)
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]
    assert [round(e.value, 5) for e in events.Scalars("eval/loss")] == [round(r["eval/loss"], 5) for r in evals]


def test_eval_loss_is_the_stage_loss_of_the_model_on_the_first_val_batches(evaluated):
    """The final step's eval/loss equals the mean loss of the exported model over the first 2 val batches."""
    config, final = evaluated
    model = mm.load(final)
    model.eval()
    data = dataclasses.replace(config.data, train=config.data.val, weights=None, resample=False)
    module = TrainModule(model, build_checked_loss(config, model))
    with torch.no_grad():
        losses = [float(module(batch)[0]) for batch in islice(build_loader(data, model, kind="interleaved"), 2)]
    logged = [r for r in rows(final.parent) if "eval/loss" in r][-1]["eval/loss"]
    assert logged == pytest.approx(sum(losses) / 2, rel=1e-5)
    train_batch = next(iter(build_loader(config.data, model, kind="interleaved")))
    with torch.no_grad():  # guard: the training data gives another number, so the check above can fail
        assert float(module(train_batch)[0]) != pytest.approx(logged, rel=1e-5)
    assert losses[0] != pytest.approx(logged, rel=1e-5)  # nor does the first batch alone


def test_eval_task_scores_are_mm_evals_scores_of_the_model(evaluated):
    from mm.evaluate.runner import evaluate
    from mm.evaluate.samples import read_samples

    config, final = evaluated
    model = mm.load(final)
    model.eval()
    task = config.trainer.eval_tasks[0]
    expected = evaluate(model, islice(read_samples(task.data, "vqa"), 4), "vqa", max_new_tokens=4, progress=False)
    assert expected["n"] == 4
    logged = [r for r in rows(final.parent) if "eval/loss" in r][-1]
    assert logged["eval/vqa/accuracy"] == pytest.approx(expected["accuracy"])


def test_own_grad_norm_equals_deepspeeds_under_zero2(corpus, tmp_path):
    """Without ZeRO the loop measures the norm itself (before the step, so before clipping); ZeRO-2's
    optimizer reports its own. Same data and seed: the same number. A tiny clip shows it is the unclipped norm."""
    norms = {}
    for stage in (0, 2):
        out = tmp_path / f"zero{stage}"
        run(tiny_config("1_align", out, corpus, "trainer.max_steps=1", "trainer.save_every=1", "trainer.clip=1e-4",
                        f"trainer.zero_stage={stage}"))
        norms[stage] = rows(out)[0]["grad_norm"]
    assert norms[0] > 1e-3  # far over the clip: the norm before clipping
    assert norms[0] == pytest.approx(norms[2], rel=1e-4)


def test_epochs_stop_after_n_passes_and_the_schedule_spans_them(corpus, tmp_path):
    # 20 held-out documents, one per row, 2 rows a batch: 10 batches a pass; 3 passes, 2 batches a step: 15 steps
    config = tiny_config("1_align", tmp_path / "epochs", corpus, f"data.train={corpus}/val/interleaved-*.tar",
                         "data.resample=false", "data.pack=false", "data.seq_len=256", "trainer.epochs=3",
                         "trainer.max_steps=null", "trainer.grad_accum=2", "trainer.save_every=100",
                         "trainer.min_lr_ratio=0.1")
    run(config)
    lines = rows(tmp_path / "epochs")
    assert [r["step"] for r in lines] == list(range(1, 16))
    assert lines[-1]["epoch"] == 3.0 and lines[4]["epoch"] == 1.0  # 5 steps x 2 batches = one pass
    base = config.stage.trainable[0].lr
    # the cosine ends at the last step: the schedule knew the run's length
    assert lines[-1]["lr"] == pytest.approx(base * lr_lambda(config.trainer.warmup_steps, 15, 0.1)(14))
    saved = json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "epochs" / "config.yaml").read_text())))
    assert saved["trainer"]["max_steps"] == 15 and saved["trainer"]["epochs"] == 3

    capped = tiny_config("1_align", tmp_path / "capped", corpus, f"data.train={corpus}/val/interleaved-*.tar",
                         "data.resample=false", "data.pack=false", "data.seq_len=256", "trainer.epochs=3",
                         "trainer.max_steps=4", "trainer.save_every=100")
    run(capped)
    assert [r["step"] for r in rows(tmp_path / "capped")] == [1, 2, 3, 4]


def test_epoch_stream_resumes_at_any_micro_batch(corpus, tmp_path):
    """Pass e shuffles with seed + e; resuming k micro-batches in gives the uninterrupted stream from k on."""
    model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama"))
    config = tiny_config("1_align", tmp_path, corpus, f"data.train={corpus}/val/interleaved-*.tar",
                         "data.resample=false", "data.shuffle_buffer=20")
    counts = [sum(1 for _ in build_loader(pass_data(config.data, e), model, kind="interleaved")) for e in range(2)]
    whole = [b["input_ids"] for b in epoch_batches(config.data, model, "interleaved", counts, 0)]
    assert len(whole) == sum(counts)
    assert not all(torch.equal(a, b) for a, b in zip(whole[:counts[0]], whole[counts[0]:]))  # reshuffled
    for skip in (1, counts[0], counts[0] + 1):
        resumed = [b["input_ids"] for b in epoch_batches(config.data, model, "interleaved", counts, skip)]
        assert len(resumed) == len(whole) - skip
        assert all(torch.equal(a, b) for a, b in zip(resumed, whole[skip:]))


@pytest.mark.parametrize("overrides, message", [
    (["trainer.epochs=2"], "trainer.epochs needs finite data: set data.resample=false"),
    (["trainer.eval_every=5"], "trainer.eval_every needs something to evaluate: set data.val"),
    (["trainer.eval_batches=5"], "trainer.eval_batches needs held-out shards: set data.val"),
    (["trainer.eval_tasks=[{task: vqa, data: x, limit: 0}]"], r"trainer.eval_tasks\[0\].limit must be a positive"),
    (["trainer.eval_tasks=[{task: bleu, data: x}]"], "expected"),
    (["trainer.max_steps=null"], "missing required config key trainer.max_steps or trainer.epochs"),
    (["trainer.report_to=[tensorboard, comet]"], "expected"),
    (["trainer.eval_batches=0", "data.val=x"], "trainer.eval_batches must be a positive integer"),
])
def test_bad_tracking_config_is_one_clear_error(corpus, tmp_path, overrides, message):
    with pytest.raises(MMError, match=message):
        validate(tiny_config("1_align", tmp_path, corpus, *overrides))


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (pip install mlflow)")
def test_report_to_mlflow_writes_a_local_file_store(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    run(tiny_config("1_align", out, corpus, "trainer.report_to=[tensorboard, mlflow]",
                    f"data.val={corpus}/val/interleaved-*.tar", "trainer.eval_batches=1"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient((out / "mlruns").resolve().as_uri())
    run_id = (out / ".mlflow-run-id").read_text()
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([r["loss"] for r in rows(out)
                                                                                      if "loss" in r])
    assert [m.step for m in client.get_metric_history(run_id, "eval/loss")] == [2]
    assert client.get_metric_history(run_id, "train/grad_norm")
    params = client.get_run(run_id).data.params
    assert params["stage.name"] == "align" and params["trainer.max_steps"] == "2"
    assert (out / "tb").is_dir()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_refused_in_one_line(corpus, tmp_path):
    cmd = [sys.executable, "recipes/train.py", "--no-progress", "--config", str(TINY / "1_align.yaml"),
           f"output_dir={tmp_path / 'run'}", f"data.train={corpus}/train/interleaved-*.tar",
           "trainer.report_to=[wandb]"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mm: error: trainer.report_to names wandb, which is not installed: pip install 'mm-vlm[wandb]' "
        "(or drop wandb from trainer.report_to)"]
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


def test_plot_panels_once_each_with_eval_overlaid(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [{"step": s, "loss": 3 / s, "lm": 3 / s, "lr": 1e-3, "tokens_per_s": 100.0, "grad_norm": 1.0 / s}
             for s in range(1, 7)] + [{"step": s, "eval/loss": 3.5 / s, "eval/lm": 3.5 / s} for s in (3, 6)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = [lines]
    assert panels(data) == [("loss", ["loss", "eval/loss"]), ("lm", ["lm", "eval/lm"]), ("grad_norm", ["grad_norm"]),
                            ("lr", ["lr"]), ("tokens_per_s", ["tokens_per_s"])]
    assert panels(data, ["lr", "tokens_per_s"]) == [("lr", ["lr"]), ("tokens_per_s", ["tokens_per_s"])]
    assert panels(data, ["loss"]) == [("loss", ["loss", "eval/loss"])]
    assert panels(data, ["eval/loss"]) == [("eval/loss", ["eval/loss"])]
    with pytest.raises(MMError, match="no metric 'los' in"):
        panels(data, ["los"])
    png = plot([run_dir], tmp_path / "curves.png", ["loss", "lr"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_recipes_still_load_with_the_new_keys():
    config = load_config(TrainConfig, [TINY / "1_align.yaml"], ["trainer.report_to=[]", "trainer.epochs=2"])
    assert config.trainer.report_to == [] and config.trainer.epochs == 2 and config.data.val is None


@pytest.mark.slow
def test_two_processes_zero3_agree_on_epochs_and_eval(corpus, tmp_path):
    """Each rank reads its own slice: both stop after the smaller rank's pass and evaluate together (no hang)."""
    out = tmp_path / "run"
    data = [f"data.train={corpus}/val/interleaved-*.tar", f"data.val={corpus}/val/interleaved-*.tar",
            "data.batch_size=2", "data.seq_len=96", "data.shuffle_buffer=8", "data.resample=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29733",
           "recipes/train.py", "--no-progress", "--config", str(TINY / "1_align.yaml"), f"output_dir={out}", *data,
           "trainer.epochs=1", "trainer.max_steps=null", "trainer.save_every=100", "trainer.eval_every=1",
           "trainer.eval_batches=2", "trainer.zero_stage=3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    config = load_config(TrainConfig, [TINY / "1_align.yaml"], [f"output_dir={out}", *data])
    model = mm.build(config.model)
    per_rank = [sum(1 for _ in build_loader(pass_data(config.data, 0), model, rank=r, world_size=2,
                                            kind="interleaved")) for r in range(2)]
    assert min(per_rank) >= 2
    lines = rows(out)
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == list(range(1, min(per_rank) + 1)) and lines[-1]["step"] == min(per_rank)
    assert [r["step"] for r in lines if "eval/loss" in r] == steps  # every step, all ranks together
