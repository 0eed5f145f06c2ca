"""Generation with experts: generated tokens take the text path; cache on/off, beams, the fast greedy loop and a
prompt prefilled in chunks all agree with one full forward."""
from __future__ import annotations

import pytest
import torch

import mm
from mm.fast_generate import greedy_generate
from tests.moe.conftest import FAMILIES, build, conversations, perturb

STEPS = 6
BOTH = mm.MoEConfig(ffn_experts=True, attn_experts=True)


def generate(model, **options):
    """transformers ``generate`` from spliced embeddings inside one routed call (it always uses the KV cache
    when given ``inputs_embeds``): returns the batch and the output with ``sequences`` (new tokens only) and
    ``logits``."""
    batch = model.collate(conversations())
    embeddings = model.embed(batch["input_ids"], batch["pixel_values"])
    with torch.no_grad(), model.routing(batch["input_ids"] == model.image_token_id):
        out = model.llm.generate(inputs_embeds=embeddings, attention_mask=batch["attention_mask"],
                                 max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                 pad_token_id=model.tokenizer.pad_token_id, output_logits=True,
                                 return_dict_in_generate=True, **options)
    return batch, out


def uncached_greedy(model, embeddings, attention_mask, image_mask, steps=STEPS):
    """Greedy decoding without a KV cache inside one routed call: every pass re-runs the prompt plus the tokens
    generated so far (more rows than the call's mask). End of sequence is never picked (as ``min_new_tokens``).
    Returns new tokens ``[B, S]`` and logits ``[B, S, V]``."""
    tokens, logits = attention_mask.new_empty(attention_mask.shape[0], 0), []
    eos = model.llm.generation_config.eos_token_id
    with torch.no_grad(), model.routing(image_mask):
        for _ in range(steps):
            rows = torch.cat([embeddings, model.llm.get_input_embeddings()(tokens)], 1)  # [B, T+n, D]
            mask = torch.cat([attention_mask, torch.ones_like(tokens)], 1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            last = model.llm(inputs_embeds=rows, attention_mask=mask, position_ids=positions,
                             use_cache=False).logits[:, -1]  # [B, V]
            logits.append(last)
            tokens = torch.cat([tokens, last.index_fill(-1, torch.tensor([eos]).flatten(), -torch.inf)
                                .argmax(-1, keepdim=True)], 1)
    return tokens, torch.stack(logits, 1)


def _full_forward_logits(model, batch, sequences):
    """One forward over prompt + generated tokens, the call's mask covering all of them (the generated ones are
    text): logits ``[B, S, V]`` that predicted each generated token."""
    full_ids = torch.cat([batch["input_ids"], sequences], 1)
    full_mask = torch.cat([batch["attention_mask"], torch.ones_like(sequences)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows (GPT-2 needs it)
    with torch.no_grad():
        full = model(full_ids, batch["pixel_values"], attention_mask=full_mask, position_ids=positions).logits
    prompt = batch["input_ids"].shape[1]
    return full[:, prompt - 1:-1]


@pytest.mark.parametrize("llm", FAMILIES)
def test_kv_cache_generation_equals_no_cache_and_a_full_forward(llm):
    model = build(llm, moe=BOTH)
    perturb(model.moe, scale=2.0)  # experts far from the LLM, so a routing mistake shows
    batch, cached = generate(model)
    embeddings = model.embed(batch["input_ids"], batch["pixel_values"])
    tokens, logits = uncached_greedy(model, embeddings, batch["attention_mask"],
                                     batch["input_ids"] == model.image_token_id)
    assert torch.equal(cached.sequences, tokens)
    torch.testing.assert_close(torch.stack(cached.logits, 1), logits, rtol=0, atol=1e-5)
    full = _full_forward_logits(model, batch, cached.sequences)
    torch.testing.assert_close(full, torch.stack(cached.logits, 1), rtol=0, atol=1e-5)


def test_topk_kv_cache_generation_equals_a_full_forward():
    model = build(moe=mm.MoEConfig(router={"name": "topk", "num_experts": 3, "top_k": 2}))
    perturb(model.moe, scale=2.0)
    batch, cached = generate(model)
    torch.testing.assert_close(_full_forward_logits(model, batch, cached.sequences), torch.stack(cached.logits, 1),
                               rtol=0, atol=1e-5)


def test_routing_matters_during_generation():
    """Guard: the perturbed experts change what is generated (else the tests above prove nothing)."""
    model = build(moe=BOTH)
    _, before = generate(model)
    perturb(model.moe, scale=2.0)
    _, after = generate(model)
    assert not torch.equal(torch.stack(before.logits), torch.stack(after.logits))


@pytest.mark.parametrize("llm", ["tiny-llama", "tiny-opt"])
def test_beam_search_and_several_sequences_expand_the_mask(llm):
    """Each returned beam's score (sum of its tokens' log-probs, length_penalty 0) equals the log-probs that one
    full forward of that sequence gives: every pass of the beam search routed its k copies of a row like the row."""
    model = build(llm, moe=BOTH)
    perturb(model.moe, scale=2.0)
    batch, out = generate(model, num_beams=2, num_return_sequences=2, length_penalty=0.0, output_scores=True)
    assert out.sequences.shape == (4, STEPS)
    expanded = {k: v.repeat_interleave(2, 0) for k, v in batch.items() if k != "pixel_values"}
    pixels = batch["pixel_values"]  # in order of appearance: the first row's two images, then the second's one
    expanded["pixel_values"] = torch.cat([pixels[:2], pixels[:2], pixels[2:], pixels[2:]])
    logits = _full_forward_logits(model, expanded, out.sequences)  # [4, S, V]
    logps = logits.log_softmax(-1).gather(-1, out.sequences[..., None]).squeeze(-1).sum(1)  # [4]
    torch.testing.assert_close(logps, out.sequences_scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize("llm", ["tiny-llama", "tiny-phi3", "tiny-opt"])
def test_fast_greedy_loop_equals_generate(llm):
    """mm.fast_generate (static cache: prefill, then one-token steps) inside one routed call."""
    model = build(llm, moe=BOTH)
    perturb(model.moe, scale=2.0)
    batch, cached = generate(model)
    fast = greedy_generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                           max_new_tokens=STEPS, pad_token_id=model.tokenizer.pad_token_id)
    assert torch.equal(fast, cached.sequences)


def test_a_prompt_prefilled_in_chunks_routes_like_one_pass():
    """A pass that starts after tokens already in the KV cache routes its own positions of the call's mask."""
    model = build(moe=BOTH)
    perturb(model.moe, scale=2.0)
    batch = model.collate(conversations()[:1])  # one row, no padding
    ids = batch["input_ids"]
    embeddings = model.embed(ids, batch["pixel_values"])
    first = int((ids[0] == model.image_token_id).nonzero()[2]) + 1  # the cut falls inside the first image
    with torch.no_grad(), model.routing(ids == model.image_token_id):
        whole = model.llm(inputs_embeds=embeddings).logits
        head = model.llm(inputs_embeds=embeddings[:, :first], use_cache=True)
        tail = model.llm(inputs_embeds=embeddings[:, first:], cache=head.cache).logits
    torch.testing.assert_close(torch.cat([head.logits, tail], 1), whole, rtol=0, atol=1e-5)


def test_a_one_token_image_prompt_generates_text_tokens():
    """Cached decoding steps are text even when they have as many tokens as the prompt."""
    model = build(moe=BOTH)
    perturb(model.moe, scale=2.0)
    embeddings = torch.randn(2, 1, model.llm.config.hidden_size) * 0.02  # [B, 1, D]: one image token per row
    image_mask, attention_mask = torch.ones(2, 1, dtype=torch.bool), torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad(), model.routing(image_mask):
        cached = model.llm.generate(inputs_embeds=embeddings, attention_mask=attention_mask, max_new_tokens=4,
                                    min_new_tokens=4, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, pad_token_id=0)
    tokens, logits = uncached_greedy(model, embeddings, attention_mask, image_mask, steps=4)
    assert torch.equal(cached.sequences, tokens)
    torch.testing.assert_close(torch.stack(cached.logits, 1), logits, rtol=0, atol=1e-5)


def test_generate_api_with_experts():
    model = build(moe=BOTH)
    (messages, images), _ = conversations()
    text = model.generate(images=images, messages=messages, max_new_tokens=4)
    assert isinstance(text, str)
    assert model.generate(images=images, messages=messages, max_new_tokens=4, num_beams=2) is not None
    assert model.moe._mask is None  # the routing context is closed afterwards
