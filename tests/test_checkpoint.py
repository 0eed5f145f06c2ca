import json

import pytest
import torch

import mm
from mm.errors import MMError
from mm.prompt import user_message


def test_save_load_is_bit_identical(tiny_model, tiny_model_dir, images):
    loaded = mm.load(tiny_model_dir)
    assert loaded.config == tiny_model.config
    batch = tiny_model.collate([([user_message("what?", 2)], images[:2])])
    assert torch.equal(tiny_model(**batch).logits, loaded(**batch).logits)
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.generate(images=images[:1], prompt="hi", max_new_tokens=6) == tiny_model.generate(
        images=images[:1], prompt="hi", max_new_tokens=6)


def test_sharded_save_loads_back(tiny_model, tmp_path, images):
    mm.save(tiny_model, tmp_path, max_shard_size=200_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = mm.load(tmp_path)
    batch = tiny_model.collate([([user_message("what?", 1)], images[:1])])
    assert torch.equal(tiny_model(**batch).logits, loaded(**batch).logits)


def test_bad_model_directories(tiny_model_dir, tmp_path):
    with pytest.raises(MMError, match="model directory not found"):
        mm.load(tmp_path / "nope")
    with pytest.raises(MMError, match="mm_config.json is missing"):
        mm.load(tmp_path)
    (tmp_path / "mm_config.json").write_text(json.dumps({"encoder": "tiny-vit"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text("{}")
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(MMError, match=r"pickled weights \(pytorch_model.bin\); only safetensors"):
        mm.load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MMError, match="cannot read weights"):
        mm.load(tmp_path)


def test_weights_that_do_not_fit_the_config(tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "mm_config.json").read_text())
    config["adapter"] = "linear"
    (tmp_path / "m" / "mm_config.json").write_text(json.dumps(config))
    with pytest.raises(MMError, match="do not fit its config"):
        mm.load(tmp_path / "m")
