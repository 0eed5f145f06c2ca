"""The export of a trained model: LoRA merged into the base weights gives the PEFT model's outputs."""
from __future__ import annotations

import torch

import mm
from mm.train import TrainConfig
from mm.train.build import apply_lora
from mm.train.checkpoints import export_state


def tiny():
    torch.manual_seed(0)
    return mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama"))


@torch.no_grad()
def test_lora_merge_reproduces_the_peft_model():
    model = tiny()
    config = TrainConfig(output_dir="unused")
    config.lora.enabled, config.lora.target_modules = True, ["q_proj", "v_proj", "down_proj"]
    apply_lora(model, config)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(std=0.2)  # B starts at zero: give the update something to merge
    ids = torch.randint(10, 200, (2, 12))
    expected = model.llm(input_ids=ids).logits
    state = export_state(model, zero3=False)
    assert not any(".lora_" in name or "base_model" in name for name in state)
    plain = tiny()
    plain.load_state_dict(state)
    merged = plain.llm(input_ids=ids).logits
    assert torch.allclose(merged, expected, atol=1e-5)
    assert not torch.allclose(tiny().llm(input_ids=ids).logits, expected, atol=1e-3)  # the update mattered
