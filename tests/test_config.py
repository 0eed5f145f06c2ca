"""Typed, nested config: parts own their options, every value is checked, old flat keys still load."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mm
from mm.adapters.pool import PoolOptions
from mm.config import ModelConfig, MoEConfig, load_config
from mm.errors import MMError
from mm.schema import Part, to_dict
from mm.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_yaml_overrides_precedence(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("encoder: timm:resnet18\nadapter: {name: pool, size: 3}\nmoe:\n  attn_experts: true\n")
    b = tmp_path / "b.yaml"
    b.write_text("adapter: {size: 5}\n")  # a section without a name keeps the part named before
    config = load_config(ModelConfig, [a, b], ["adapter.hidden=16", "moe.layers=[0, 1]"])
    assert config.encoder.name == "timm:resnet18"
    assert config.adapter == Part("pool", PoolOptions(size=5, hidden=16))
    assert isinstance(config.moe, MoEConfig) and config.moe.attn_experts and config.moe.layers == [0, 1]
    assert config.llm.name == ModelConfig().llm.name


def test_a_part_named_alone_gets_its_default_options():
    config = load_config(ModelConfig, [], ["adapter=pool"])
    assert config.adapter == Part("pool", PoolOptions())
    assert ModelConfig(adapter={"name": "pool", "size": 2}).adapter.options.size == 2


def test_unknown_keys_name_the_key_and_the_valid_ones():
    with pytest.raises(MMError, match=r"unknown config key 'adapter.sise'; valid keys: size, hidden"):
        load_config(ModelConfig, [], ["adapter=pool", "adapter.sise=3"])
    with pytest.raises(MMError, match=r"unknown config key 'moe.experts'"):
        load_config(ModelConfig, [], ["moe.experts=3"])
    with pytest.raises(MMError, match=r"unknown config key 'llm.size'; this section takes no options"):
        load_config(ModelConfig, [], ["llm.size=3"])
    with pytest.raises(MMError, match=r"unknown adapter 'poool'; choose one of: .*pool"):
        load_config(ModelConfig, [], ["adapter=poool"])


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=two", "config key data.batch_size: expected int, got 'two'"),
    ("trainer.betas=0.9", "config key trainer.betas: expected list[float], got 0.9"),
    ("stage.trainable=adapter.*", "config key stage.trainable: expected list[TrainableGroup | str], got 'adapter.*'"),
    ("trainer.zero_stage=4", "config key trainer.zero_stage: expected one of 0, 1, 2, 3, got 4"),
    ("data.pack=maybe", "config key data.pack: expected bool, got 'maybe'"),
    ("model.adapter.size=1.5", "config key model.adapter.size: expected int, got 1.5"),
    ("stage.loss.kl=sideways", "config key stage.loss.kl: expected one of 'forward', 'reverse', 'js', got 'sideways'"),
])
def test_wrong_types_name_the_key_the_type_and_the_value(override, message):
    recipe = ROOT / "recipes" / "tiny" / ("distill_dpt.yaml" if "stage.loss" in override else "1_align.yaml")
    overrides = (["model.adapter=pool"] if "adapter.size" in override else []) + [override]
    with pytest.raises(MMError) as info:
        load_config(TrainConfig, [recipe], overrides)
    assert str(info.value) == message


def test_floats_in_every_spelling_are_floats(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainer: {lr: 1e-3, min_lr_ratio: 1.0e-2, clip: 2}\nstage: {trainable: ['adapter.*']}\n")
    config = load_config(TrainConfig, [recipe], ["trainer.weight_decay=1e-2"])
    assert config.trainer.lr == 0.001 and config.trainer.min_lr_ratio == 0.01 and config.trainer.clip == 2.0
    assert config.trainer.weight_decay == 0.01 and isinstance(config.trainer.clip, float)


def test_old_flat_keys_in_a_saved_model_still_load(tmp_path):
    """A model saved before parts owned their options (flat pool_size, select_layer, ...) loads unchanged."""
    model = mm.build(ModelConfig(adapter={"name": "pool", "size": 2}))
    model.save(tmp_path)
    flat = {"encoder": "tiny-vit", "adapter": "pool", "llm": "tiny-llama", "encoder_path": None, "select_layer": -1,
            "image_size": None, "pool_size": 2, "resampler_queries": 64, "adapter_hidden": None, "freeze_llm": True,
            "freeze_encoder": True, "dtype": "float32", "moe": None}
    (tmp_path / "mm_config.json").write_text(json.dumps(flat))
    loaded = mm.load(tmp_path)
    assert loaded.config.adapter == Part("pool", PoolOptions(size=2))
    assert loaded.tokens_per_image == 4


def test_old_flat_moe_router_keys_move_into_the_router():
    config = load_config(ModelConfig, [], ["moe.router=topk", "moe.num_experts=3", "moe.top_k=1"])
    assert config.moe.router.name == "topk" and config.moe.router.options.num_experts == 3
    assert config.moe.router.options.top_k == 1
    assert load_config(ModelConfig, [], ["moe.num_experts=3"]).moe.router.name == "modality"  # unused: dropped


def test_old_loss_sections_move_into_the_stage_loss(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("dpo: {beta: 0.3, reference: precomputed}\ndistill: {kl: js}\n"
                      "stage: {loss: dpo, trainable: ['adapter.*']}\n")
    config = load_config(TrainConfig, [recipe])
    assert config.stage.loss.name == "dpo" and config.stage.loss.options.beta == 0.3
    assert config.stage.loss.options.reference == "precomputed"


def test_config_round_trips_through_plain_data():
    config = load_config(TrainConfig, [ROOT / "recipes" / "tiny" / "distill_dpt.yaml"])
    again = type(config)(**{k: v for k, v in vars(config).items()})
    assert to_dict(again) == to_dict(config)
    from mm.schema import from_dict

    assert to_dict(from_dict(TrainConfig, to_dict(config))) == to_dict(config)


def test_bad_files_are_clear(tmp_path):
    with pytest.raises(MMError, match="not found"):
        load_config(ModelConfig, [tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(MMError, match="not valid YAML"):
        load_config(ModelConfig, [bad])
    with pytest.raises(MMError, match="key=value"):
        load_config(ModelConfig, [], ["adapter"])


@pytest.mark.parametrize("override, key", [("data.batch_size=two", "data.batch_size"),
                                           ("trainer.betas=0.9", "trainer.betas")])
def test_train_script_refuses_a_wrong_type_in_one_line(override, key, tmp_path):
    """The acceptance case through the real script: one `mm: error:` line naming the key, exit 2, no traceback."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "train.py"), "--config", str(ROOT / "recipes/tiny/1_align.yaml"),
         f"output_dir={tmp_path / 'run'}", override], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mm: error: config key " + key), result.stderr
    assert not (tmp_path / "run").exists()
