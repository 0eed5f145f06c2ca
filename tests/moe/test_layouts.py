"""What attach_experts refuses, in one line each: bad configs, undeclared families, layers that do not match
their declared layout, a router a layout cannot serve. Never partial coverage."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig

import mm
from mm.compose import assemble, build_encoder
from mm.errors import MMError
from mm.llm.tiny import build_tiny
from tests.moe.conftest import build


def _assemble(llm_config, moe: mm.MoEConfig):
    """A MultimodalModel around a tiny random LLM of any transformers family."""
    config = mm.ModelConfig(encoder={"name": "patch:32", "image_size": 56}, adapter="pixel-shuffle", moe=moe)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(llm_config)
    tokenizer = build_tiny("llama")[1]  # a fresh copy of the tiny tokenizer (the model adds <image> to it)
    return assemble(config, build_encoder(config, pretrained=True), llm, tokenizer)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_config_errors_are_clear():
    with pytest.raises(MMError, match="out of range"):
        build(moe=mm.MoEConfig(layers=[5]))
    with pytest.raises(MMError, match="twice"):
        build(moe=mm.MoEConfig(layers=[1, -1]))
    with pytest.raises(MMError, match="router"):
        build(moe=mm.MoEConfig(router="hash"))
    with pytest.raises(MMError, match="top_k"):
        build(moe=mm.MoEConfig(router={"name": "topk", "num_experts": 2, "top_k": 3}))
    with pytest.raises(MMError, match="ffn_experts"):
        build(moe=mm.MoEConfig(ffn_experts=False, attn_experts=False))


def test_a_family_without_a_declared_layout_is_refused():
    neox = GPTNeoXConfig(vocab_size=1100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256)
    with pytest.raises(MMError, match=r"no layout is declared for LLM family 'gpt_neox'.*declared: gpt2, llama") as e:
        _assemble(neox, mm.MoEConfig(ffn_experts=True, attn_experts=True))
    _one_line(e)
    assert _assemble(neox, None).moe is None  # without experts the family is fine


def test_a_layer_with_undeclared_parts_is_refused_not_partially_covered():
    """GPT-2 built with cross-attention has projections the GPT-2 layout does not declare."""
    cross = GPT2Config(vocab_size=1100, n_embd=64, n_layer=2, n_head=4, n_positions=256, add_cross_attention=True)
    with pytest.raises(MMError, match=r"GPT-2 decoder layer 0 .*undeclared parameterised parts .*crossattention") as e:
        _assemble(cross, mm.MoEConfig(ffn_experts=True, attn_experts=True))
    _one_line(e)


def test_topk_router_on_a_split_ffn_is_refused():
    with pytest.raises(MMError, match=r"router=topk: the OPT FFN is fc1/fc2 on the decoder layer") as e:
        build("tiny-opt", mm.MoEConfig(router={"name": "topk", "num_experts": 2, "top_k": 1}))
    _one_line(e)
    assert build("tiny-phi3", mm.MoEConfig(router={"name": "topk", "num_experts": 2, "top_k": 1})).moe is not None
