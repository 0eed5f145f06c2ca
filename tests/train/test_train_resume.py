"""Resume after ``kill -9`` equals an uninterrupted run; ZeRO-3 on 2 CPU processes saves and resumes."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mm.train import checkpoints

from train_helpers import ROOT, TINY, run, subprocess_env, tiny_config

STEPS = ["trainer.max_steps=8", "trainer.save_every=2", "trainer.keep_last=2", "trainer.grad_accum=2"]


def _cli(config_overrides: list[str]) -> list[str]:
    return [sys.executable, "recipes/train.py", "--no-progress", "--config", str(TINY / "1_align.yaml"),
            *config_overrides]


def _overrides(corpus, out):
    return [f"output_dir={out}", f"data.train={corpus}/train/interleaved-*.tar", "data.batch_size=2",
            "data.seq_len=96", "data.shuffle_buffer=8", *STEPS]


def test_resume_after_kill_equals_uninterrupted(corpus, tmp_path):
    reference = run(tiny_config("1_align", tmp_path / "straight", corpus, *STEPS))

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(_overrides(corpus, out)), cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-00000004" / "complete").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it could be killed"
    assert checkpoints.latest(out)[0] in (4, 6)

    resumed = subprocess.run(_cli(_overrides(corpus, out)), cwd=ROOT, env=subprocess_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    at_6 = checkpoints.safe_load(out / "checkpoints" / "step-00000006" / "ds" / "state" / "mp_rank_00_model_states.pt")
    assert any(not torch.equal(a[n], at_6["module"][f"model.{n}"]) for n in a if n.startswith("adapter."))
    assert [s for s, _ in checkpoints.complete_checkpoints(out)] == [6, 8]  # keep_last=2
    # resume state holds the trained tensors only: the frozen LLM and encoder come back from the build
    state = checkpoints.safe_load(out / "checkpoints" / "step-00000008" / "ds" / "state" / "mp_rank_00_model_states.pt")
    assert state["module"] and all(name.startswith("model.adapter.") for name in state["module"])
    assert not (out / "checkpoints" / "step-00000008" / "model").exists()
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_zero3_two_processes_trains_saves_and_resumes(corpus, tmp_path):
    out = tmp_path / "zero3"

    def launch(steps: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
               "recipes/train.py", "--no-progress", "--config", str(TINY / "1_align.yaml"),
               *_overrides(corpus, out)[:-4], f"trainer.max_steps={steps}", "trainer.save_every=2",
               "trainer.zero_stage=3"]
        proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    launch(3)
    resumed = launch(4)  # each rank loads its own partition files, unpickled with weights_only=True
    assert "checkpoints/step-00000003 (step 3)" in resumed.stdout
    import mm
    from mm.config import load_config
    from mm.train import TrainConfig
    from mm.train.build import build_student

    model = mm.load(out / "final")
    start = build_student(load_config(TrainConfig, [out / "config.yaml"]))  # the frozen weights' source
    adapter_changed = any(not torch.equal(p, q) for p, q in zip(model.adapter.parameters(), start.adapter.parameters()))
    llm_same = all(torch.equal(p, q) for p, q in zip(model.llm.parameters(), start.llm.parameters()))
    assert adapter_changed and llm_same
    state = out / "checkpoints" / "step-00000004" / "ds" / "state"
    assert sorted(p.name for p in state.iterdir()) == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
                                                       for r in (0, 1) for kind in ("model", "optim")]
