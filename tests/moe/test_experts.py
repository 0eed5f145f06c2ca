"""Contracts of the modality experts: exact reproduction at init, routing only image tokens, full coverage of
every declared layout, naming."""
from __future__ import annotations

import copy
import fnmatch

import pytest
import torch

import mm
from mm.moe import LAYOUTS, ModalityForward, TopKForward, decoder_layers, layout_for
from tests.moe.conftest import FAMILIES, build, mixed_batch, perturb

KINDS = {"ffn": dict(ffn_experts=True), "attn": dict(ffn_experts=False, attn_experts=True),
         "both": dict(ffn_experts=True, attn_experts=True)}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_every_declared_layout_has_a_tiny_llm_here():
    """A layout declared in mm/moe/layouts.py is tested the day it is declared."""
    assert {build(llm).llm.config.model_type for llm in FAMILIES} == set(LAYOUTS)


@pytest.mark.parametrize("llm", FAMILIES)
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


@pytest.mark.parametrize("llm", FAMILIES)
def test_every_declared_module_of_every_layer_is_routed(llm):
    """Full coverage: each FFN module and each attention projection the layout declares has its expert."""
    model = build(llm, mm.MoEConfig(ffn_experts=True, attn_experts=True))
    layout = layout_for(model.llm)
    for i, layer in enumerate(decoder_layers(model.llm)):
        attention = getattr(layer, layout.attention)
        modules = [getattr(layer, n) for n in layout.ffn] + [getattr(attention, n) for n in layout.projections]
        assert all(isinstance(m.__dict__.get("forward"), ModalityForward) for m in modules), (llm, i)
        assert sorted(model.moe.attn_experts[str(i)]) == sorted(layout.projections)


@pytest.mark.parametrize("llm", FAMILIES)
def test_routed_modules_are_actually_in_the_forward_path(llm):
    """Guard for the equality test above: perturbed experts must change the output."""
    model = build(llm, moe=mm.MoEConfig(ffn_experts=True, attn_experts=True))
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


@pytest.mark.parametrize("llm", FAMILIES)
def test_last_layer_ffn_expert_changes_only_image_positions(llm):
    """Invariant: with the FFN expert on the LAST layer only, nothing after it mixes positions, so perturbing
    it changes the logits of exactly the image positions and of no text position."""
    model = build(llm, moe=mm.MoEConfig(layers=[-1]))
    assert list(model.moe.ffn_experts) == ["1"]
    batch = mixed_batch(model)
    before = logits(model, batch)
    perturb(model.moe.ffn_experts)
    changed = (logits(model, batch) != before).any(-1)  # [B, T]
    is_image, valid, _ = _positions(batch, model)
    assert torch.equal(changed & valid, is_image)


@pytest.mark.parametrize("llm", FAMILIES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_all_layer_experts_leave_positions_before_the_first_image_unchanged(llm, kind):
    """Invariant with experts on every layer: causal attention lets later text see the changed image states,
    but every position before the first image of its row is bit-identical; image positions all change."""
    model = build(llm, moe=mm.MoEConfig(**KINDS[kind]))
    batch = mixed_batch(model)
    before = logits(model, batch)
    perturb(model.moe)
    changed = (logits(model, batch) != before).any(-1)
    is_image, valid, before_first = _positions(batch, model)
    assert before_first.sum() > 5
    assert not changed[before_first].any()
    assert changed[is_image].all()


def test_calling_the_llm_outside_a_routed_call_runs_the_plain_llm():
    plain = build()
    model = build(moe=mm.MoEConfig(ffn_experts=True, attn_experts=True))
    perturb(model.moe, scale=2.0)
    batch = mixed_batch(model)
    embeddings = model.embed(batch["input_ids"], batch["pixel_values"])
    with torch.no_grad():
        model(**batch)  # a routed call first: its routing must not leak into the next plain call
        direct = model.llm(inputs_embeds=embeddings, attention_mask=batch["attention_mask"]).logits
        expected = plain.llm(inputs_embeds=embeddings, attention_mask=batch["attention_mask"]).logits
    assert torch.equal(direct, expected)


def test_expert_parameters_are_owned_once_under_moe_names():
    model = build(moe=mm.MoEConfig(ffn_experts=True, attn_experts=True))
    names = [n for n, _ in model.named_parameters()]
    state = model.state_dict()
    assert len(state) == len(set(state)) == len(names)
    assert "llm.model.layers.1.mlp.gate_proj.weight" in state and "moe.ffn_experts.1.gate_proj.weight" in state
    assert "moe.attn_experts.0.q_proj.weight" in state
    expert_ids = {id(p) for p in model.moe.parameters()}
    assert not any(id(p) in expert_ids for p in model.llm.parameters())
    assert fnmatch.filter(names, "moe.ffn_experts.*") and fnmatch.filter(names, "moe.attn_experts.*")
    assert all(n.startswith(("moe.ffn_experts.", "moe.attn_experts.")) for n in names if n.startswith("moe."))
    # storage is not shared between an expert and its LLM module (training one leaves the other alone)
    llm_ptrs = {p.data_ptr() for p in model.llm.parameters()}
    assert not any(p.data_ptr() in llm_ptrs for p in model.moe.parameters())


@pytest.mark.parametrize("moe", [mm.MoEConfig(ffn_experts=True, attn_experts=True), mm.MoEConfig(router={"name": "topk"})],
                         ids=["modality", "topk"])
def test_the_llm_module_tree_is_untouched_and_shares_no_dicts(moe):
    plain = build()
    model = build(moe=moe)
    assert [(n, type(m)) for n, m in model.llm.named_modules()] == [(n, type(m)) for n, m in plain.llm.named_modules()]
    modules = list(model.modules())
    for attr in ("_parameters", "_buffers", "_modules"):
        assert len({id(getattr(m, attr)) for m in modules}) == len(modules), attr
    routed = [m for m in model.llm.modules() if isinstance(m.__dict__.get("forward"), (ModalityForward, TopKForward))]
    assert routed


def test_a_deep_copy_routes_through_its_own_experts():
    model = build(moe=mm.MoEConfig(ffn_experts=True, attn_experts=True))
    batch = mixed_batch(model)
    before = logits(model, batch)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, batch), before)
    perturb(twin.moe)
    assert not torch.equal(logits(twin, batch), before)
    assert torch.equal(logits(model, batch), before)  # the original's experts and routing are its own
