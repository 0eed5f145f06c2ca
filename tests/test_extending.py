"""Extending mm: a new encoder family, adapter, LLM family and loss, each defined and registered right here, in one
place apiece, exactly as a contributor's new file would. Nothing else is edited: the registry-driven contract
tests (test_contracts.py) cover them, and the loss trains from a recipe through the one training loop.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from mm.adapters.base import ADAPTERS, Adapter
from mm.encoders.base import ENCODERS, VisionEncoder
from mm.llm.base import LLMS
from mm.parts import registry
from mm.train.losses.base import LOSSES, Loss
from mm.train.losses.forward import hidden_states, label_positions, logits_at, targets_at


# ----- a new encoder family: a strided convolution as a 4 x 4 token grid ---------------------------------
@dataclass
class ConvGridOptions:
    width: int = 8


class ConvGridEncoder(VisionEncoder):
    def __init__(self, width: int):
        super().__init__()
        self.dim, self.grid, self.image_size = width, (4, 4), 32
        self.conv = nn.Conv2d(3, width, kernel_size=8, stride=8)
        self.transform = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, 32, 32] -> [B, 16, width]
        return self.conv(pixel_values).flatten(2).transpose(1, 2)


@ENCODERS.register("test-conv-grid", options=ConvGridOptions, example=lambda workdir: {"name": "test-conv-grid",
                                                                                        "width": 12})
def build_conv_grid(arg, options: ConvGridOptions, pretrained: bool, saved=None) -> ConvGridEncoder:
    return ConvGridEncoder(options.width)


# ----- a new adapter: 2 x 2 average pooling, then one linear layer -------------------------------------
class AvgLinearAdapter(Adapter):
    def __init__(self, encoder: VisionEncoder, llm_dim: int):
        super().__init__()
        self.prefix, self.grid = encoder.num_prefix_tokens, encoder.grid
        self.num_tokens = (encoder.grid[0] // 2) * (encoder.grid[1] // 2)
        self.proj = nn.Linear(encoder.dim, llm_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, N, Din] -> [B, M, Dllm]
        x = tokens[:, self.prefix:].transpose(1, 2).unflatten(2, self.grid)  # [B, Din, rows, cols]
        return self.proj(F.avg_pool2d(x, 2).flatten(2).transpose(1, 2))


@ADAPTERS.register("test-avg-linear")
def build_avg_linear(encoder: VisionEncoder, llm_dim: int, options) -> AvgLinearAdapter:
    return AvgLinearAdapter(encoder, llm_dim)


# ----- a new LLM family: a one-layer Qwen2 with the tiny test tokenizer --------------------------------
@LLMS.register("test-one-layer-qwen2")
def build_one_layer(arg, options):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from mm.llm.tiny import build_tiny

    _, tokenizer = build_tiny("qwen2")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config), tokenizer


# ----- a new loss: LM loss plus a z-loss on the log-partition function ---------------------------------
@dataclass
class ZLossOptions:
    weight: float = 1e-4


class ZLoss(Loss):
    """``nll + weight * mean(logsumexp(logits)^2)`` over labelled positions (PaLM's z-loss)."""

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, model, batch):
        positions = label_positions(batch["labels"])
        logits = logits_at(model, hidden_states(model, batch), positions)  # [N, V]
        nll = F.cross_entropy(logits, targets_at(batch["labels"], positions))
        z = logits.logsumexp(-1).pow(2).mean()
        return nll + self.weight * z, {"lm": nll.detach(), "z": z.detach()}


@LOSSES.register("test-zloss", options=ZLossOptions)
def build_zloss(options: ZLossOptions, config) -> ZLoss:
    return ZLoss(options.weight)


# ----- the tests ---------------------------------------------------------------------------------------
def test_new_parts_are_in_their_registries_with_their_options():
    assert registry("encoder").entry("test-conv-grid").options is ConvGridOptions
    assert "test-avg-linear" in registry("adapter").names()
    assert "test-one-layer-qwen2" in registry("llm").names()
    assert registry("loss").entry("test-zloss").options is ZLossOptions


def test_a_new_model_composes_from_new_parts_by_name():
    import mm

    model = mm.build(mm.ModelConfig(encoder={"name": "test-conv-grid", "width": 6}, adapter="test-avg-linear",
                                    llm="test-one-layer-qwen2"))
    assert model.tokens_per_image == 4 and model.encoder.dim == 6


def test_a_new_loss_trains_from_a_recipe(tmp_path):
    """The z-loss stage: one recipe file, the real DeepSpeed loop, no edit to the loop or the config schema."""
    import mm
    from mm.config import load_config
    from mm.train import TrainConfig
    from mm.train.loop import train

    from test_contracts import lm_batch

    recipe = tmp_path / "zloss.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path / 'run'}\n"
        "model: {encoder: tiny-vit, adapter: mlp, llm: tiny-llama}\n"
        "stage:\n  name: zloss\n  loss: {name: test-zloss, weight: 1.0e-3}\n"
        "  trainable: [{pattern: 'adapter.*', lr: 1.0e-3}]\n"
        "trainer: {max_steps: 2, save_every: 2}\n")
    config = load_config(TrainConfig, [recipe])
    torch.manual_seed(config.trainer.seed)
    batch = lm_batch(mm.build(config.model))
    train(config, batches=[batch, batch], progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(line["z"] > 0 and abs(line["loss"] - line["lm"] - 1e-3 * line["z"]) < 1e-4 for line in lines)
    assert (tmp_path / "run" / "final" / "mm_config.json").is_file()


def test_the_contract_tests_walk_the_new_parts(tmp_path):
    from test_contracts import examples

    assert "test-conv-grid" in dict(examples("encoder", tmp_path))
    assert {"test-avg-linear", "test-one-layer-qwen2", "test-zloss"} <= {
        name for kind in ("adapter", "llm", "loss") for name, _ in examples(kind, tmp_path)}


def test_a_broken_part_fails_the_contract_by_name(tmp_path):
    """Guard: an adapter that lets the CLS token through breaks the adapter contract, and the failure names it."""
    import pytest

    from test_contracts import test_every_adapter

    class LeakyAdapter(AvgLinearAdapter):
        def forward(self, tokens):
            return super().forward(tokens) + tokens[:, :1, :1].mean()  # depends on the prefix token

    ADAPTERS.register("test-leaky")(lambda encoder, llm_dim, options: LeakyAdapter(encoder, llm_dim))
    try:
        with pytest.raises(AssertionError, match=r"test-leaky.*prefix tokens changed the output"):
            test_every_adapter(tmp_path)
    finally:
        ADAPTERS.unregister("test-leaky")
