"""Checkpoints hold what trains and reference the rest; resume checks the config and the frozen weights, never
unpickles code, and falls back past checkpoints that do not load. Real DeepSpeed runs of the tiny align recipe."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mm
from mm.errors import MMError
from mm.train import checkpoints
from mm.train.build import apply_lora, build_student
from mm.train.engine import lr_lambda
from mm.train.loop import train
from mm.train.resume import frozen_digest
from mm.train.stage import apply_stage, parse_trainable

from train_helpers import ROOT, TINY, run, subprocess_env, tiny_config


def state_file(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}" / "ds" / "state" / "mp_rank_00_model_states.pt"


def cli(out: Path, corpus: Path, *extra: str) -> list[str]:
    """``recipes/train.py`` with the overrides ``tiny_config`` applies (so only ``extra`` changes the config)."""
    return [sys.executable, "recipes/train.py", "--no-progress", "--config", str(TINY / "1_align.yaml"),
            f"output_dir={out}", f"data.train={corpus}/train/interleaved-*.tar", "data.batch_size=2", "data.seq_len=96",
            "data.shuffle_buffer=8", "trainer.max_steps=2", "trainer.save_every=2", *extra]


def launch(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def metrics(out: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "lr" in row}


class _Touch:
    """Unpickling this opens (creates) ``path``: any code could run in its place."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(out: Path, step: int, marker: Path) -> Path:
    """Replace the checkpoint's model states with a pickle that creates ``marker``; fix the manifest to match (the
    attacker controls the directory). Returns a copy of the planted file."""
    target = state_file(out, step)
    target.write_bytes(pickle.dumps(_Touch(str(marker)), protocol=2))  # protocol 2: the loader meets the GLOBAL
    manifest_path = target.parents[2] / checkpoints.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][str(target.relative_to(target.parents[2]))] = target.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    copy = out.parent / f"planted-{step}.pt"
    copy.write_bytes(target.read_bytes())
    return copy


def test_a_checkpoint_holds_the_trainable_state_and_references_the_frozen_weights(corpus, tmp_path):
    config = tiny_config("1_align", tmp_path / "run", corpus)
    out = run(config).parent
    directory = out / "checkpoints" / "step-00000002"
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    assert files == ["base.json", "checkpoint.json", "complete", "config.yaml", "ds/state/mp_rank_00_model_states.pt"]
    student = build_student(config)
    apply_stage(student, parse_trainable(config.stage.trainable, config.trainer.lr))
    trainable = {f"model.{n}" for n, p in student.named_parameters() if p.requires_grad}
    assert set(checkpoints.safe_load(state_file(out, 2))["module"]) == trainable
    base = json.loads((directory / "base.json").read_text())
    assert base["frozen"]["student"] == frozen_digest(student)  # the build it references rebuilds the same weights
    assert base["model"]["llm"]["name"] == "tiny-llama" and "init_from" not in base
    held = json.loads((directory / "checkpoint.json").read_text())["bytes"]
    assert held["trainable"] == 4 * sum(p.numel() for p in student.parameters() if p.requires_grad)
    # the final export stays self-contained: every weight, loadable alone
    assert set(load_file(str(out / "final" / "model.safetensors"))) == set(mm.load(out / "final").state_dict())


@pytest.fixture
def tied_llm():
    """A tiny Llama whose LM head is its (frozen) input embedding: one tensor under two names, as in SmolLM2."""
    from mm.llm import LLMS
    from mm.llm.tiny import build_tiny

    def build(arg, options):
        llm, tokenizer = build_tiny("llama")
        llm.config.tie_word_embeddings = True
        llm.lm_head.weight = llm.model.embed_tokens.weight
        return llm, tokenizer

    LLMS.register("test-tied-llama")(build)
    yield "test-tied-llama"
    LLMS.unregister("test-tied-llama")


def test_a_tied_frozen_weight_stays_out_of_the_checkpoint(corpus, tmp_path, tied_llm):
    config = tiny_config("1_align", tmp_path / "run", corpus, f"model.llm={tied_llm}")
    student = build_student(config)
    assert student.llm.lm_head.weight is student.llm.model.embed_tokens.weight
    out = run(config).parent
    saved = set(checkpoints.safe_load(state_file(out, 2))["module"])
    assert saved and all(name.startswith("model.adapter.") for name in saved), sorted(saved)
    run(tiny_config("1_align", out, corpus, f"model.llm={tied_llm}", "trainer.max_steps=3"))
    assert checkpoints.latest(out)[0] == 3


def test_checkpoint_overhead_of_the_tiny_recipe_is_the_trainable_state():
    """Each checkpoint writes the trainable state plus a few kB; a copy of the frozen weights would make it ~11."""
    from tools.bench.checkpoint import run as bench

    result = bench(tiny=True)
    assert result["trainable_bytes"] == 4 * 6272 and result["optimizer_bytes"] >= 2 * 4 * 6272  # the adapter, AdamW
    assert result["checkpoint_overhead"] <= 1.3, result
    assert result["final_export_bytes"] > 8 * result["checkpoint_bytes"]


def test_frozen_digest_sees_a_changed_frozen_tensor_not_a_trained_one():
    def tiny():
        torch.manual_seed(0)
        model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama"))
        apply_stage(model, parse_trainable(["adapter.*"], 1e-3))
        return model

    model, digest = tiny(), frozen_digest(tiny())
    assert frozen_digest(model) == digest and digest["tensors"] > 0
    with torch.no_grad():
        next(model.adapter.parameters()).add_(1.0)
    assert frozen_digest(model) == digest
    with torch.no_grad():
        model.llm.model.layers[-1].mlp.down_proj.weight.mul_(1.01)
    assert frozen_digest(model) != digest


def test_resume_refuses_a_changed_config_before_building_the_model(corpus, tmp_path):
    out = tmp_path / "run"
    run(tiny_config("1_align", out, corpus))
    written = (out / "config.yaml").read_text()
    changed = tiny_config("1_align", out, corpus, "model.encoder=hf:/no/such/tower", "data.batch_size=3",
                          "stage.trainable=[{pattern: 'adapter.*', lr: 0.002}]")
    with pytest.raises(MMError) as refused:
        run(changed)  # building this encoder would fail: the check answers first
    message = str(refused.value)
    assert "\n" not in message
    for part in ("model.encoder.name", "data.batch_size", "stage.trainable", "--allow-config-change", "output_dir"):
        assert part in message
    assert "trainer.max_steps" not in message
    assert (out / "config.yaml").read_text() == written
    # harmless keys may change
    run(tiny_config("1_align", out, corpus, "trainer.max_steps=3", "trainer.save_every=3", "trainer.log_every=3",
                    "trainer.keep_last=1"))
    assert [s for s, _ in checkpoints.complete_checkpoints(out)] == [3]


def test_an_accepted_lr_change_takes_effect(corpus, tmp_path):
    out = tmp_path / "run"
    run(tiny_config("1_align", out, corpus))  # adapter lr 1e-3, warmup 5
    new_lr = ["stage.trainable=[{pattern: 'adapter.*', lr: 0.005}]", "trainer.max_steps=4"]
    refused = launch(cli(out, corpus, *new_lr))
    errors = [line for line in refused.stderr.splitlines() if line.startswith("mm: error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "stage.trainable" in errors[0], refused.stderr[-2000:]
    accepted = launch(cli(out, corpus, *new_lr, "--allow-config-change"))
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    assert "resuming from" in accepted.stdout
    factor = lr_lambda(5, 4, 0.1)
    lrs = {step: row["lr"] for step, row in metrics(out).items()}
    assert lrs[2] == pytest.approx(1e-3 * lr_lambda(5, 2, 0.1)(1))
    assert lrs[3] == pytest.approx(0.005 * factor(2)) and lrs[4] == pytest.approx(0.005 * factor(3))
    assert "lr: 0.005" in (out / "checkpoints" / "step-00000004" / "config.yaml").read_text()


def test_an_accepted_trainable_set_change_still_needs_a_checkpoint_that_fits(corpus, tmp_path):
    out = tmp_path / "run"
    run(tiny_config("1_align", out, corpus))
    wider = tiny_config("1_align", out, corpus, "stage.trainable=[adapter.*, encoder.*]", "trainer.max_steps=3")
    with pytest.raises(MMError, match=r"another model or trainable set: \d+ of this run's trainable parameters "
                                      r"missing \(e\.g\. \['model\.encoder\."):
        train(wider, progress=False, allow_config_change=True)


def test_resume_refuses_frozen_weights_that_changed_under_it(corpus, tmp_path):
    base = run(tiny_config("1_align", tmp_path / "align", corpus))
    out = tmp_path / "run"
    config = tiny_config("1_align", out, corpus, f"init_from={base}")
    run(config)
    assert json.loads((out / "base.json").read_text())["init_from"] == str(base.resolve())
    model = mm.load(base)
    with torch.no_grad():
        model.llm.model.layers[0].mlp.down_proj.weight.add_(0.5)
    mm.save(model, base)  # the referenced base, retrained or replaced
    with pytest.raises(MMError, match=r"frozen weights \(student\) differ"):
        run(tiny_config("1_align", out, corpus, f"init_from={base}", "trainer.max_steps=3"))
    train(tiny_config("1_align", out, corpus, f"init_from={base}", "trainer.max_steps=3"), progress=False,
          allow_config_change=True)
    assert checkpoints.latest(out)[0] == 3


def test_corrupt_checkpoints_fall_back_to_the_previous_complete_one(corpus, tmp_path, capfd):
    out = tmp_path / "run"
    run(tiny_config("1_align", out, corpus, "trainer.max_steps=6", "trainer.keep_last=3"))
    six, four = state_file(out, 6), state_file(out, 4)
    six.write_bytes(b"\x00" * six.stat().st_size)  # the size the manifest lists: only loading finds it out
    four.write_bytes(four.read_bytes()[:200])  # cut short
    capfd.readouterr()
    run(tiny_config("1_align", out, corpus, "trainer.max_steps=7", "trainer.keep_last=3"))
    printed = capfd.readouterr()
    assert "step-00000002 (step 2)" in printed.out
    warnings = [line for line in printed.err.splitlines() if line.startswith("mm: warning: checkpoint")]
    assert len(warnings) == 2 and "step-00000006" in warnings[0] and "step-00000004" in warnings[1], printed.err
    assert sorted(metrics(out)) == list(range(1, 8))
    assert [s for s, _ in checkpoints.complete_checkpoints(out)] == [4, 6, 7]


def test_a_planted_pickle_never_runs_and_resume_falls_back(corpus, tmp_path, capfd):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    run(tiny_config("1_align", out, corpus, "trainer.max_steps=4"))
    planted = plant(out, 4, marker)
    capfd.readouterr()
    run(tiny_config("1_align", out, corpus, "trainer.max_steps=4"))
    printed = capfd.readouterr()
    assert not marker.exists()
    assert "step-00000002 (step 2)" in printed.out
    assert "names io.open, code that unpickling would run" in printed.err
    with pytest.raises(RuntimeError):  # guard: loaded as DeepSpeed loads it, the planted file runs its code
        torch.load(planted, weights_only=False)
    assert marker.exists()


def test_a_planted_pickle_in_the_only_checkpoint_ends_with_one_error_line(corpus, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    run(tiny_config("1_align", out, corpus))
    plant(out, 2, marker)
    resumed = launch(cli(out, corpus))
    assert not marker.exists()
    assert resumed.returncode == 2
    errors = [line for line in resumed.stderr.splitlines() if "mm: error:" in line]
    assert len(errors) == 1 and errors[0] == resumed.stderr.strip().splitlines()[-1], resumed.stderr[-2000:]
    assert errors[0].startswith(f"mm: error: no checkpoint of {out} loads (step-00000002: ")
    assert "names io.open" in errors[0]


def test_lora_checkpoint_holds_the_adapters_and_resumes_exactly(corpus, tmp_path):
    base = run(tiny_config("1_align", tmp_path / "align", corpus))

    def lora(out: Path, steps: int):
        return tiny_config("3_instruct_lora", out, corpus, f"init_from={base}", f"trainer.max_steps={steps}")

    straight = run(lora(tmp_path / "straight", 3))
    out = tmp_path / "resumed"
    run(lora(out, 2))
    config = lora(out, 2)
    student = build_student(config)
    apply_lora(student, config)
    apply_stage(student, parse_trainable(config.stage.trainable, config.trainer.lr))
    saved = set(checkpoints.safe_load(state_file(out, 2))["module"])
    assert saved == {f"model.{n}" for n, p in student.named_parameters() if p.requires_grad}
    assert any(".lora_A." in name for name in saved) and not any("base_layer" in name for name in saved)
    resumed = run(lora(out, 3))
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_safe_load_refuses_a_pickle_that_names_code(tmp_path, protocol):
    marker, planted = tmp_path / "code-ran", tmp_path / "planted.pt"
    planted.write_bytes(pickle.dumps(_Touch(str(marker)), protocol=protocol))
    with pytest.raises(checkpoints.Unloadable, match="resume unpickles tensors and DeepSpeed's state classes only"):
        checkpoints.safe_load(planted)
    assert not marker.exists()
