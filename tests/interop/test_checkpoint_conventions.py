"""mm model directories follow transformers conventions: config JSON + safetensors, sharded with an index."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

import mm
from mm.errors import MMError


def test_sharded_save_loads_back_bit_identical(towers, build_model, tmp_path, picture):
    model = build_model(towers["siglip"], "mlp")
    mm.save(model, tmp_path, max_shard_size=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert not (tmp_path / "model.safetensors").exists()
    stored = set()
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            stored |= set(handle.keys())
    assert stored == set(index["weight_map"])  # the index tells the truth about every shard
    assert AutoConfig.from_pretrained(tmp_path / "llm").model_type == "llama"

    loaded = mm.load(tmp_path)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    batch = model.collate([([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                            picture[:1])])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_pickle_only_directory_is_refused(towers, build_model, tmp_path):
    model = build_model(towers["clip"], "linear")
    mm.save(model, tmp_path / "m", max_shard_size=60_000)
    for path in [*tmp_path.glob("m/model*.safetensors"), tmp_path / "m" / "model.safetensors.index.json"]:
        path.unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(MMError, match=r"holds pickled weights \(pytorch_model.bin\); only safetensors are loaded"):
        mm.load(tmp_path / "m")
