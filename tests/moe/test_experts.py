"""Contracts of the modality experts: exact reproduction at init, routing only image tokens, naming."""
from __future__ import annotations

import fnmatch

import pytest
import torch

import mm
from mm.errors import MMError
from tests.moe.conftest import FAMILIES, build, mixed_batch, perturb

KINDS = {"ffn": dict(ffn_experts=True), "attn": dict(ffn_experts=False, attn_experts=True),
         "both": dict(ffn_experts=True, attn_experts=True)}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("llm", FAMILIES + ["tiny-gpt2"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_copied_experts_reproduce_the_plain_llm_exactly(llm, kind):
    plain = build(llm)
    model = build(llm, mm.MoEConfig(**KINDS[kind]))
    batch = mixed_batch(model)
    assert (batch["input_ids"] == model.image_token_id).sum() == 3 * model.tokens_per_image
    assert (batch["attention_mask"] == 0).any()  # left padding is exercised too
    # The LLM keeps its own parameter names and tensors; the experts are extra, under moe.*
    plain_state, state = plain.state_dict(), model.state_dict()
    assert set(state) - set(plain_state) == {k for k in state if k.startswith("moe.")}
    assert set(plain_state) <= set(state)
    assert all(torch.equal(plain_state[k], state[k]) for k in plain_state)
    assert torch.equal(logits(plain, batch), logits(model, batch))


def test_routed_modules_are_actually_in_the_forward_path():
    """Guard for the equality test above: perturbed experts must change the output."""
    model = build(moe=mm.MoEConfig(ffn_experts=True, attn_experts=True))
    batch = mixed_batch(model)
    before = logits(model, batch)
    perturb(model.moe.attn_experts)
    after_attn = logits(model, batch)
    assert not torch.equal(before, after_attn)
    perturb(model.moe.ffn_experts)
    assert not torch.equal(after_attn, logits(model, batch))


@pytest.mark.parametrize("kind", list(KINDS))
def test_text_only_input_never_touches_visual_experts(kind):
    model = build(moe=mm.MoEConfig(**KINDS[kind]), freeze_llm=False)
    model.train()
    ids, labels = model.tokenize([{"role": "user", "content": "how many shapes"},
                                  {"role": "assistant", "content": "three"}], add_generation_prompt=False)
    out = model(torch.tensor([ids]), labels=torch.tensor([labels]))
    out.loss.backward()
    experts = list(model.moe.parameters())
    assert experts and all(p.grad is None for p in experts)
    assert all(p.grad is not None for p in model.llm.model.layers[0].parameters())
    # the same model with an image: now the experts get gradients (so the check above can fail)
    batch = mixed_batch(model)
    labels = batch["input_ids"].masked_fill((batch["input_ids"] == model.image_token_id) | (batch["attention_mask"] == 0), -100)
    model(**batch, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts)


def _positions(batch, model):
    is_image = batch["input_ids"] == model.image_token_id  # [B, T]
    valid = batch["attention_mask"].bool()
    first_image = is_image.float().argmax(1)  # [B]
    before = torch.arange(is_image.shape[1])[None] < first_image[:, None]
    return is_image, valid, before & valid


def test_last_layer_ffn_expert_changes_only_image_positions():
    """Invariant: with the FFN expert on the LAST layer only, nothing after it mixes positions, so perturbing
    it changes the logits of exactly the image positions and of no text position."""
    model = build(moe=mm.MoEConfig(layers=[-1]))
    assert list(model.moe.ffn_experts) == ["1"]
    batch = mixed_batch(model)
    before = logits(model, batch)
    perturb(model.moe.ffn_experts)
    changed = (logits(model, batch) != before).any(-1)  # [B, T]
    is_image, valid, _ = _positions(batch, model)
    assert torch.equal(changed & valid, is_image)


@pytest.mark.parametrize("kind", list(KINDS))
def test_all_layer_experts_leave_positions_before_the_first_image_unchanged(kind):
    """Invariant with experts on every layer: causal attention lets later text see the changed image states,
    but every position before the first image of its row is bit-identical; image positions all change."""
    model = build(moe=mm.MoEConfig(**KINDS[kind]))
    batch = mixed_batch(model)
    before = logits(model, batch)
    perturb(model.moe)
    changed = (logits(model, batch) != before).any(-1)
    is_image, valid, before_first = _positions(batch, model)
    assert before_first.sum() > 5
    assert not changed[before_first].any()
    assert changed[is_image].all()


def test_expert_parameters_are_owned_once_under_moe_names():
    model = build(moe=mm.MoEConfig(ffn_experts=True, attn_experts=True))
    names = [n for n, _ in model.named_parameters()]
    state = model.state_dict()
    assert len(state) == len(set(state)) == len(names)
    expert_ids = {id(p) for p in model.moe.parameters()}
    assert not any(id(p) in expert_ids for p in model.llm.parameters())
    assert fnmatch.filter(names, "moe.ffn_experts.*") and fnmatch.filter(names, "moe.attn_experts.*")
    assert all(n.startswith(("moe.ffn_experts.", "moe.attn_experts.")) for n in names if n.startswith("moe."))
    # storage is not shared between an expert and its LLM module (training one leaves the other alone)
    llm_ptrs = {p.data_ptr() for p in model.llm.parameters()}
    assert not any(p.data_ptr() in llm_ptrs for p in model.moe.parameters())


def test_config_errors_are_clear():
    with pytest.raises(MMError, match="out of range"):
        build(moe=mm.MoEConfig(layers=[5]))
    with pytest.raises(MMError, match="twice"):
        build(moe=mm.MoEConfig(layers=[1, -1]))
    with pytest.raises(MMError, match="router"):
        build(moe=mm.MoEConfig(router="hash"))
    with pytest.raises(MMError, match="top_k"):
        build(moe=mm.MoEConfig(router="topk", num_experts=2, top_k=3))
    with pytest.raises(MMError, match="ffn_experts"):
        build(moe=mm.MoEConfig(ffn_experts=False, attn_experts=False))
