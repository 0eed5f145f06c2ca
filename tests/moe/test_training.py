"""Training with experts: EViP S1.1 freezing through the real stage globs and DeepSpeed engine; gradient
checkpointing sees the same routing as a plain forward."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
    assert config.model.encoder.startswith("patch") and config.model.moe.ffn_experts
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


def test_gradient_checkpointing_routes_like_a_plain_forward():
    grads = []
    for checkpointing in (False, True):
        model = build(moe=mm.MoEConfig(ffn_experts=True, attn_experts=True))
        perturb(model.moe, scale=1.0)
        if checkpointing:
            model.llm.activation_checkpointing_enable()
        model.train()
        batch = _labelled(model, mixed_batch(model))
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("moe.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
