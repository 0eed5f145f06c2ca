"""Fail fast (mm/train/preflight.py): what a run needs that can be checked without its weights fails before
DeepSpeed is imported or any weight is read, with one line."""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mm.config import load_config
from mm.errors import MMError
from mm.train import TrainConfig
from mm.train.preflight import meta_model, preflight

ROOT = Path(__file__).resolve().parents[2]
TINY_ALIGN = ROOT / "recipes" / "tiny" / "1_align.yaml"


def config(tmp_path: Path, corpus: Path, *overrides: str, recipe: Path = TINY_ALIGN) -> TrainConfig:
    return load_config(TrainConfig, [recipe], [f"output_dir={tmp_path / 'run'}",
                                               f"data.train={corpus}/train/interleaved-*.tar", *overrides])


def mm_train(*args: str) -> tuple[subprocess.CompletedProcess, bool]:
    """``mm train ARGS`` through the real entry point in a fresh interpreter; also whether the process imported
    DeepSpeed (which any op build, process group or ``deepspeed.initialize`` needs)."""
    code = textwrap.dedent(f"""
        import sys
        from mm.cli import main
        status = main({["train", *args]!r})
        print("deepspeed imported:", any(m == "deepspeed" or m.startswith("deepspeed.") for m in sys.modules))
        sys.exit(status)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return result, "deepspeed imported: True" in result.stdout


def assert_one_line(result: subprocess.CompletedProcess, pattern: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("mm: error: ") and pattern in lines[0], result.stderr[-3000:]


def test_typo_in_a_trainable_glob_fails_before_deepspeed(tmp_path, corpus):
    result, imported = mm_train("--config", str(TINY_ALIGN), f"output_dir={tmp_path / 'run'}",
                                f"data.train={corpus}/train/interleaved-*.tar",
                                "stage.trainable=[{pattern: adaptr.*, lr: 1.0e-3}]")
    assert_one_line(result, "stage.trainable pattern 'adaptr.*' matches no parameter")
    assert not imported


def test_missing_shards_fail_before_deepspeed(tmp_path):
    result, imported = mm_train("--config", str(TINY_ALIGN), f"output_dir={tmp_path / 'run'}",
                                f"data.train={tmp_path}/nope/*.tar")
    assert_one_line(result, "data.train: no shards found")
    assert not imported


def test_a_good_config_passes_preflight(tmp_path, corpus):
    """Guard for the refusals below: the same recipe, spelt right, passes (and leaves no probe file)."""
    preflight(config(tmp_path, corpus))
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize("override, message", [
    ("stage.trainable=[adapter.mlp.9.*]", "matches no parameter"),
    ("data.val=/nope/val-*.tar", "data.val: no shards found"),
    ("trainer.eval_tasks=[{task: caption, data: /nope/eval}]", "trainer.eval_tasks[0].data: no shards found"),
    ("init_from=/nope/run", "model or run directory not found"),
    ("output_dir=/proc/mm-run", "output_dir '/proc/mm-run' is not a writable directory"),
    ("model.llm=hf:/nope/llm", "has no config.json"),
    ("model.encoder=hf:/nope/clip", "is not a model directory"),
])
def test_preflight_refuses(tmp_path, corpus, override, message):
    with pytest.raises(MMError, match=message.replace("[", r"\[").replace("]", r"\]")):
        preflight(config(tmp_path, corpus, override))


def test_output_dir_under_a_file_is_refused(tmp_path, corpus):
    (tmp_path / "file").write_text("")
    with pytest.raises(MMError, match="is not a writable directory"):
        preflight(config(tmp_path, corpus, f"output_dir={tmp_path / 'file' / 'run'}"))


@pytest.mark.parametrize("content", ["{nope", "[1, 2]"])
def test_a_deepspeed_json_that_is_not_an_object_is_refused(tmp_path, corpus, content):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(MMError, match="trainer.deepspeed_config"):
        preflight(config(tmp_path, corpus, f"trainer.deepspeed_config={path}"))


def test_globs_are_checked_against_an_init_from_model(tmp_path, corpus, tiny_model_dir):
    good = config(tmp_path, corpus, f"init_from={tiny_model_dir}", "stage.trainable=[llm.model.layers.0.*]")
    preflight(good)
    bad = config(tmp_path, corpus, f"init_from={tiny_model_dir}", "stage.trainable=[llm.model.layer.0.*]")
    with pytest.raises(MMError, match="matches no parameter"):
        preflight(bad)


def test_lora_globs_need_lora(tmp_path, corpus):
    recipe = ROOT / "recipes" / "tiny" / "3_instruct_lora.yaml"
    preflight(config(tmp_path, corpus, "init_from=null", recipe=recipe))
    with pytest.raises(MMError, match="lora"):
        preflight(config(tmp_path, corpus, "init_from=null", "lora.enabled=false", recipe=recipe))


@pytest.mark.parametrize("recipe", ["1_align", "3_instruct_lora", "evip_s1_1"])
def test_the_meta_model_has_the_parameter_names_of_the_real_one(tmp_path, corpus, recipe):
    """The names preflight checks globs against are those ``apply_stage`` sees after the real build."""
    from mm.train.build import apply_lora, build_student

    run = config(tmp_path, corpus, "init_from=null", recipe=ROOT / "recipes" / "tiny" / f"{recipe}.yaml")
    meta = meta_model(run)
    assert meta is not None and {p.device.type for p in meta.parameters()} == {"meta"}
    real = build_student(run)
    apply_lora(real, run)
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in real.named_parameters()]


def test_every_registered_encoder_gives_the_meta_model_its_real_names(tmp_path, corpus):
    """Contract over the encoder registry: preflight checks globs for every encoder (open_clip builds off meta)."""
    from mm.config import ModelConfig
    from mm.parts import registry
    from mm.train.build import build_student

    encoders = registry("encoder")
    for name in encoders.names():
        example = encoders.entry(name).extras.get("example")
        (tmp_path / name).mkdir()
        spec = example(tmp_path / name) if example else None
        if spec is None:
            continue
        run = config(tmp_path, corpus)
        run.model = ModelConfig(encoder=spec, adapter="mlp", llm="tiny-llama")
        meta = meta_model(run)
        assert meta is not None, name
        assert [n for n, _ in meta.named_parameters()] == [n for n, _ in build_student(run).named_parameters()], name


def test_op_build_cache_is_per_environment(tmp_path):
    """Two virtual environments get two TORCH_EXTENSIONS_DIRs by default; a user's own setting wins. (DeepSpeed
    builds an op at ``init_distributed`` on CPU: it is called only where that op is already cached, by the other
    training tests of this environment.)"""
    other = tmp_path / "other-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True, timeout=120)
    paths = os.pathsep.join([str(ROOT), *site.getsitepackages()])  # this environment's packages, seen from the other
    code = textwrap.dedent("""
        import json, os, sys
        from mm.train.engine import extensions_dir, init_distributed
        if sys.argv[1] == "init":
            init_distributed()
        print(json.dumps([sys.prefix, str(extensions_dir()), os.environ.get("TORCH_EXTENSIONS_DIR")]))
    """)
    env = {k: v for k, v in os.environ.items()  # not this process's op folder, nor its process group's port
           if k not in ("TORCH_EXTENSIONS_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "LOCAL_WORLD_SIZE")}

    def ask(python: Path, init: bool, **extra) -> list[str]:
        result = subprocess.run([str(python), "-c", code, "init" if init else "-"], capture_output=True, text=True,
                                timeout=900, env={**env, "PYTHONPATH": paths, **extra})
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    here, there = ask(Path(sys.executable), init=True), ask(other / "bin" / "python", init=False)
    assert here[0] != there[0] and here[1] != there[1]
    assert here[2] == here[1]  # init_distributed's default is this environment's folder
    mine = tmp_path / "mine"
    mine.symlink_to(here[1], target_is_directory=True)  # the user's path, holding the op already built
    assert ask(Path(sys.executable), init=True, TORCH_EXTENSIONS_DIR=str(mine))[2] == str(mine)
