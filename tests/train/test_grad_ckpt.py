"""``trainer.gradient_checkpointing``: one step through the real DeepSpeed engine and the real LM loss gives the same
loss and gradients with checkpointing as without, for a full finetune with a trained timm tower, modality experts
(FFN and attention) and a top-k router (with its balance loss) over a frozen LLM, and LoRA; the layers really are
recomputed in backward (the guard that the equality is not vacuous). The tiny path of the memory benchmark runs."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from mm.config import load_config
from mm.train import TrainConfig
from mm.train.build import TrainModule, apply_lora, build_student
from mm.train.engine import init_distributed, initialize
from mm.train.losses.lm import LMLoss
from mm.train.stage import apply_stage, parse_trainable, train_mode_where_trained

from train_helpers import TINY

CASES = {
    # timm tower (set_grad_checkpointing) + adapter + every LLM weight
    "plain": ("1_align.yaml", ["model.freeze_encoder=false", "stage.trainable=[encoder.*, adapter.*, llm.*]"]),
    # frozen LLM in eval mode; gradients cross it to FFN and attention experts, the tower and the adapter
    "experts": ("evip_s1_1.yaml", ["model.freeze_encoder=false", "model.moe.attn_experts=true",
                                   "stage.trainable=[encoder.*, adapter.*, moe.*]"]),
    # learned router: its balance loss is made inside the checkpointed layers
    "topk": ("evip_s1_1.yaml", ["model.moe.router={name: topk, num_experts: 3, top_k: 2}",
                                "stage.trainable=[adapter.*, moe.*]"]),
    "lora": ("1_align.yaml", ["lora.enabled=true", "stage.trainable=[adapter.*, 'llm.*lora_*']"]),
}


def _image(seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy())


def _batch(model) -> dict[str, torch.Tensor]:
    """A row with two images and a text-only row, answers labelled, right-padded."""
    contents = [[{"type": "image"}, {"type": "text", "text": "how many shapes"}, {"type": "image"}],
                [{"type": "text", "text": "describe a red circle on the left"}]]
    answers = ["there are two red circles", "a big red circle"]
    rows = [model.tokenize([{"role": "user", "content": c}, {"role": "assistant", "content": a}],
                           add_generation_prompt=False) for c, a in zip(contents, answers)]
    width = max(len(ids) for ids, _ in rows)
    pad = model.tokenizer.pad_token_id
    return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "pixel_values": model.preprocess([_image(1), _image(2)])}


def _first(modules, kind: str):
    return next(m for n, m in modules if n.endswith(kind))


def one_step(case: str, checkpointing: bool, tmp_path):
    """Loss, parts, gradients of every trained parameter, and how many times the first decoder layer's attention
    and the tower's first block ran (forward + recomputation)."""
    recipe, overrides = CASES[case]
    config = load_config(TrainConfig, [TINY / recipe], [f"output_dir={tmp_path / case}", "trainer.max_steps=1",
                                                        f"trainer.gradient_checkpointing={str(checkpointing).lower()}",
                                                        *overrides])
    model = build_student(config)
    apply_lora(model, config)
    groups = apply_stage(model, parse_trainable(config.stage.trainable, config.trainer.lr))
    init_distributed()
    engine = initialize(TrainModule(model, LMLoss()), groups, config)
    train_mode_where_trained(engine.module)
    runs = {"attention": 0, "tower block": 0}  # pre-hooks: a recomputation may stop once it has what backward needs
    _first(model.llm.named_modules(), "layers.0.self_attn").register_forward_pre_hook(
        lambda *_: runs.__setitem__("attention", runs["attention"] + 1))
    for block in [m for n, m in model.encoder.named_modules() if n.endswith("blocks.0")]:
        block.register_forward_pre_hook(lambda *_: runs.__setitem__("tower block", runs["tower block"] + 1))
    loss, parts = engine(_batch(model))
    engine.backward(loss)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), parts, grads, runs


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_gives_the_same_loss_and_gradients(case, tmp_path):
    loss, parts, grads, runs = one_step(case, False, tmp_path)
    loss_ckpt, parts_ckpt, grads_ckpt, runs_ckpt = one_step(case, True, tmp_path)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=0)
    assert parts.keys() == parts_ckpt.keys()
    if case == "topk":
        assert "moe_aux" in parts
    assert grads.keys() == grads_ckpt.keys() and grads
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # the guard: without checkpointing each layer runs once; with it, again in backward
    assert runs["attention"] == 1 and runs_ckpt["attention"] == 2
    if case == "plain":  # the trained timm tower recomputes its blocks too
        assert runs["tower block"] == 1 and runs_ckpt["tower block"] == 2


@pytest.mark.slow
def test_bench_tiny_path_reports_the_memory_ratio():
    from tools.bench import grad_ckpt

    result = grad_ckpt.run(quick=True, tiny=True)  # two fresh processes; the figures are not asserted
    for key in ("grad_ckpt_memory_ratio", "grad_ckpt_activation_ratio", "grad_ckpt_time_ratio", "peak_gb_with",
                "peak_gb_without"):
        assert result[key] > 0, (key, result)
