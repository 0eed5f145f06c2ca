import pytest

from mm.config import ModelConfig, MoEConfig, load_config
from mm.errors import MMError


def test_defaults_yaml_overrides_precedence(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("encoder: timm:resnet18\npool_size: 3\nmoe:\n  attn_experts: true\n")
    b = tmp_path / "b.yaml"
    b.write_text("pool_size: 5\n")
    config = load_config(ModelConfig, [a, b], ["adapter=pool", "moe.layers=[0, 1]"])
    assert config.encoder == "timm:resnet18" and config.pool_size == 5 and config.adapter == "pool"
    assert isinstance(config.moe, MoEConfig) and config.moe.attn_experts and config.moe.layers == [0, 1]
    assert config.llm == ModelConfig().llm


def test_unknown_keys_name_the_key_and_the_valid_ones(tmp_path):
    with pytest.raises(MMError, match=r"unknown config key 'pool_sise'.*pool_size"):
        load_config(ModelConfig, [], ["pool_sise=3"])
    with pytest.raises(MMError, match=r"unknown config key 'moe.experts'"):
        load_config(ModelConfig, [], ["moe.experts=3"])


def test_bad_files_are_clear(tmp_path):
    with pytest.raises(MMError, match="not found"):
        load_config(ModelConfig, [tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(MMError, match="not valid YAML"):
        load_config(ModelConfig, [bad])
    with pytest.raises(MMError, match="key=value"):
        load_config(ModelConfig, [], ["pool_size"])
