"""Every shipped recipe loads and validates; the large family builds on the meta device (no weights)."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm.config import load_config
from mm.errors import MMError
from mm.train import TrainConfig, validate
from mm.train.build import apply_lora
from mm.train.engine import deepspeed_config, lr_lambda
from mm.train.stage import apply_stage, parse_trainable

from train_helpers import ROOT, subprocess_env

RECIPES = sorted((ROOT / "recipes").glob("*/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_loads_and_validates(path: Path):
    config = validate(load_config(TrainConfig, [path]))
    assert config.stage.trainable and config.output_dir


def _meta_model(config: TrainConfig):
    """The recipe's architecture with every tensor on the meta device (configs only, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import mm.adapters  # noqa: F401
    from mm.compose import assemble
    from mm.llm.base import prepare_tokenizer
    from mm.llm.tiny import tiny_tokenizer

    from large_parts import llm_config, vision_tower

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llm_config(config.model.llm))
        encoder = vision_tower(config.model)
    # a copy: assemble adds <image> to the tokenizer, and the cached one is shared by every tiny build
    return assemble(config.model, encoder, llm, prepare_tokenizer(copy.deepcopy(tiny_tokenizer())))


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "large").glob("*.yaml")), ids=lambda p: p.stem)
def test_large_recipe_builds_on_meta(path: Path):
    config = validate(load_config(TrainConfig, [path]))
    root = config
    while root.init_from:  # chained stages inherit the architecture of the stage they start from
        parents = [load_config(TrainConfig, [p]) for p in (ROOT / "recipes" / "large").glob("*.yaml")]
        root = next(p for p in parents if p.output_dir == root.init_from)
    config.model = root.model
    model = _meta_model(config)
    with torch.device("meta"):
        apply_lora(model, config)
    groups = apply_stage(model, parse_trainable(config.stage.trainable, config.trainer.lr))
    trainable = sum(p.numel() for g in groups for p in g["params"])
    total = sum(p.numel() for p in model.parameters())
    assert total > 1e9 and 0 < trainable <= total
    ds = deepspeed_config(config)
    assert ds["zero_optimization"]["stage"] == config.trainer.zero_stage


def test_unmatched_glob_is_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(MMError, match="matches no parameter"):
        apply_stage(model, [("adapter.*", 1e-3)])


def test_warmup_then_cosine():
    f = lr_lambda(warmup_steps=4, max_steps=20, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and abs(f(20) - 0.1) < 1e-12 and f(10) > f(15)


def test_user_deepspeed_json_fills_auto(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text('{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}')
    config = load_config(TrainConfig, [ROOT / "recipes/tiny/1_align.yaml"], [f"trainer.deepspeed_config={user}"])
    ds = deepspeed_config(config)
    assert ds["train_micro_batch_size_per_gpu"] == config.data.batch_size
    assert ds["zero_optimization"]["stage"] == 2 and ds["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize("overrides,message", [
    (["bogus.key=1"], "unknown config key"),
    (["data.train="], "missing required config key data.train"),
    (["trainer.max_steps=0"], "trainer.max_steps must be a positive"),
    (["data.batch_size=0"], "data.batch_size must be a positive integer, got 0"),
    (["data.max_row_image_tokens=-5"], "data.max_row_image_tokens must be a positive integer, got -5"),
    (["stage.loss=ppo"], "config key stage.loss: unknown loss 'ppo'; choose one of: distill, dpo"),
    (["trainer.precision=fp16"], "config key trainer.precision: expected one of 'fp32', 'bf16', got 'fp16'"),
    (["stage.trainable=[{pattern: 'adapter.*', lr: fast}]"], r"config key stage.trainable\[0\].lr: expected float \| None, got 'fast'"),
])
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(MMError, match=message):
        config = validate(load_config(TrainConfig, [ROOT / "recipes/tiny/1_align.yaml"], overrides))
        parse_trainable(config.stage.trainable, 1e-3)


@pytest.mark.parametrize("args,message", [
    (["--config", "recipes/tiny/1_align.yaml", "bogus.key=1"], "unknown config key"),
    (["--config", "recipes/tiny/1_align.yaml", "output_dir=/tmp/mm-x", "data.train=/nonexistent/*.tar"],
     "no shards found"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = subprocess.run([sys.executable, "recipes/train.py", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mm: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_unmatched_glob_exits_2(corpus, tmp_path):
    proc = subprocess.run([sys.executable, "recipes/train.py", "--config", "recipes/tiny/1_align.yaml",
                           f"output_dir={tmp_path}", f"data.train={corpus}/train", "stage.trainable=[{pattern: nothing.*}]"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mm: error:")]
    assert len(errors) == 1 and "matches no parameter" in errors[0], proc.stderr
