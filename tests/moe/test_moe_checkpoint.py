"""Saving and loading keep the experts: mm.load rebuilds them from the saved config."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import mm
from tests.moe.conftest import build, mixed_batch, perturb


@pytest.mark.parametrize("moe", [mm.MoEConfig(ffn_experts=True, attn_experts=True, layers=[0]),
                                 mm.MoEConfig(router={"name": "topk", "num_experts": 3, "top_k": 1})], ids=["modality", "topk"])
def test_save_load_gives_identical_logits(moe, tmp_path):
    model = build(moe=moe)
    perturb(model.moe, scale=1.0)  # trained-looking experts that differ from the LLM's modules
    perturb(model.adapter, seed=2)
    batch = mixed_batch(model)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
        assert json.loads(handle.metadata()["aliases"]) == {}  # no tensor saved twice under two names
    assert names == set(model.state_dict())
    assert any(n.startswith("moe.") for n in names)
    loaded = mm.load(tmp_path)
    assert loaded.config.moe == moe and loaded.moe is not None
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    for name, tensor in loaded.moe.state_dict().items():
        assert torch.equal(tensor, model.moe.state_dict()[name])


def test_plain_llm_checkpoint_keeps_standard_names():
    """The LLM's own state dict is untouched by the surgery, so ``llm.save_pretrained`` exports a plain model."""
    plain = build()
    model = build(moe=mm.MoEConfig(ffn_experts=True, attn_experts=True))
    assert list(model.llm.state_dict()) == list(plain.llm.state_dict())


@pytest.mark.parametrize("llm", ["tiny-llama", "tiny-opt"])
def test_llm_save_pretrained_writes_the_plain_llm(llm, tmp_path):
    """``llm.save_pretrained`` of a model with experts writes exactly the plain LLM: same names and tensors,
    and a transformers reload computes what the LLM computes outside a routed call."""
    from transformers import AutoModelForCausalLM

    plain = build(llm)
    model = build(llm, moe=mm.MoEConfig(ffn_experts=True, attn_experts=True))
    perturb(model.moe, scale=1.0)
    model.llm.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert list(reloaded.state_dict()) == list(plain.llm.state_dict())
    assert all(torch.equal(t, plain.llm.state_dict()[k]) for k, t in reloaded.state_dict().items())
    ids = mixed_batch(model)["input_ids"]
    ids = ids.masked_fill(ids == model.image_token_id, 0)  # the plain LLM's vocabulary has no <image>
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, plain.llm(ids).logits)
