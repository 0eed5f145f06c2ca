"""Training with experts: EViP S1.1 freezing through the real stage globs and DeepSpeed engine; gradient
checkpointing sees the same routing as a plain forward."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import CheckpointError

import mm
from mm.config import load_config
from tests.moe.conftest import build, mixed_batch, perturb

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "evip_s1_1.yaml"


def _labelled(model, batch):
    labels = batch["input_ids"].masked_fill((batch["input_ids"] == model.image_token_id) |
                                            (batch["attention_mask"] == 0), -100)
    return {**batch, "labels": labels}


def test_evip_s1_1_step_leaves_every_llm_tensor_bit_identical(tmp_path):
    from mm.train.config import TrainConfig
    from mm.train.engine import init_distributed, initialize
    from mm.train.losses.lm import LMLoss
    from mm.train.stage import apply_stage, parse_trainable

    config = load_config(TrainConfig, [RECIPE], [f"output_dir={tmp_path}", "model.freeze_encoder=false"])
    assert config.model.encoder.name.startswith("patch") and config.model.moe.ffn_experts
    torch.manual_seed(0)
    model = mm.build(config.model)
    groups = apply_stage(model, parse_trainable(config.stage.trainable, config.trainer.lr))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.patch_embed", "encoder.pos_embed", "adapter.", "moe.ffn_experts."))
                             for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_distributed()
    engine = initialize(model, groups, config)
    model.train()
    batch = _labelled(model, mixed_batch(model))
    loss, _ = LMLoss()(engine.module, batch)
    engine.backward(loss)
    engine.step()
    after = model.state_dict()
    llm_keys = [k for k in after if k.startswith("llm.")]
    assert llm_keys and all(torch.equal(before[k], after[k]) for k in llm_keys)
    for name in trainable:
        assert not torch.equal(before[name], after[name]), name


def _loss_and_grads(llm: str, checkpointing: dict | None, between=None):
    """One labelled forward + backward of a model with perturbed FFN and attention experts; ``between`` runs
    after the forward, before the backward."""
    model = build(llm, moe=mm.MoEConfig(ffn_experts=True, attn_experts=True))
    perturb(model.moe, scale=1.0)
    if checkpointing is not None:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model.train()
    batch = _labelled(model, mixed_batch(model))
    loss = model(**batch).loss
    if between is not None:
        between(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("llm", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_routes_like_a_plain_forward(llm, reentrant):
    """Recomputation runs in backward, after the routed call closed: same loss and gradients as without."""
    loss, grads = _loss_and_grads(llm, None)
    checkpointed_loss, checkpointed = _loss_and_grads(llm, {"use_reentrant": reentrant})
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-5, atol=0)
    assert grads.keys() == checkpointed.keys() and any(n.startswith("moe.") for n in grads)
    for name in grads:
        torch.testing.assert_close(checkpointed[name], grads[name], rtol=1e-5, atol=1e-7)


def test_a_pass_between_forward_and_backward_reroutes_the_recomputation():
    """Guard for the test above, and the documented limit: recomputation reuses the routing of the decoder's
    last pass, so a plain pass of the same LLM between forward and backward changes what is recomputed
    (non-reentrant checkpointing notices and raises; reentrant checkpointing gives other gradients)."""
    def plain_pass(model, batch):
        with torch.no_grad():
            model.llm(input_ids=batch["input_ids"].masked_fill(batch["input_ids"] == model.image_token_id, 0))

    with pytest.raises(CheckpointError):
        _loss_and_grads("tiny-llama", {"use_reentrant": False}, between=plain_pass)
    _, grads = _loss_and_grads("tiny-llama", {"use_reentrant": True})
    _, rerouted = _loss_and_grads("tiny-llama", {"use_reentrant": True}, between=plain_pass)
    assert any(not torch.allclose(rerouted.get(n, torch.zeros_like(g)), g) for n, g in grads.items())
