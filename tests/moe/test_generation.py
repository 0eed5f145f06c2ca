"""Cached decoding with experts: generated tokens take the text path; cache on/off agree with a full forward."""
from __future__ import annotations

import pytest
import torch

import mm
from tests.moe.conftest import build, conversations, perturb

STEPS = 6


def generate(model, use_cache: bool, **options):
    batch = model.collate(conversations())
    embeddings = model.embed(batch["input_ids"], batch["pixel_values"])
    with torch.no_grad(), model.routing(batch["input_ids"] == model.image_token_id):
        out = model.llm.generate(inputs_embeds=embeddings, attention_mask=batch["attention_mask"],
                                 max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, use_cache=use_cache,
                                 pad_token_id=model.tokenizer.pad_token_id, output_logits=True,
                                 return_dict_in_generate=True, **options)
    return batch, out


@pytest.mark.parametrize("moe", [mm.MoEConfig(ffn_experts=True, attn_experts=True),
                                 mm.MoEConfig(router="topk", num_experts=3, top_k=2)], ids=["modality", "topk"])
def test_kv_cache_generation_equals_no_cache_and_a_full_forward(moe):
    model = build(moe=moe)
    perturb(model.moe, scale=2.0)  # experts far from the LLM, so a routing mistake shows
    batch, cached = generate(model, use_cache=True)
    _, uncached = generate(model, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=0, atol=1e-5)
    # A single forward over prompt + generated tokens (the generated ones are text) gives the same logits.
    full_ids = torch.cat([batch["input_ids"], cached.sequences], 1)
    full_mask = torch.cat([batch["attention_mask"], torch.ones_like(cached.sequences)], 1)
    with torch.no_grad():
        full = model(full_ids, batch["pixel_values"], attention_mask=full_mask).logits  # [B, T+S, V]
    prompt = batch["input_ids"].shape[1]
    torch.testing.assert_close(full[:, prompt - 1:-1], torch.stack(cached.logits, 1), rtol=0, atol=1e-5)


def test_routing_matters_during_generation():
    """Guard: the perturbed experts change what is generated (else the test above proves nothing)."""
    model = build(moe=mm.MoEConfig(ffn_experts=True, attn_experts=True))
    _, before = generate(model, use_cache=True)
    perturb(model.moe, scale=2.0)
    _, after = generate(model, use_cache=True)
    assert not torch.equal(torch.stack(before.logits), torch.stack(after.logits))


def test_beam_search_and_several_sequences_expand_the_mask():
    model = build(moe=mm.MoEConfig(ffn_experts=True, attn_experts=True))
    perturb(model.moe, scale=2.0)
    options = dict(num_beams=2, num_return_sequences=2)
    _, cached = generate(model, use_cache=True, **options)
    _, uncached = generate(model, use_cache=False, **options)
    assert cached.sequences.shape[0] == 4
    assert torch.equal(cached.sequences, uncached.sequences)


def test_generate_api_with_experts():
    model = build(moe=mm.MoEConfig(ffn_experts=True, attn_experts=True))
    (messages, images), _ = conversations()
    text = model.generate(images=images, messages=messages, max_new_tokens=4)
    assert isinstance(text, str)
    assert model.moe._mask is None  # the routing context is closed afterwards
