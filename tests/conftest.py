"""Shared fixtures: a tiny random model (tiny-vit + mlp + tiny-llama), built once and saved once."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import mm


@pytest.fixture(scope="session")
def tiny_model() -> mm.MultimodalModel:
    torch.manual_seed(0)
    return mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-model")
    tiny_model.save(directory)
    return directory


@pytest.fixture()
def images() -> list[Image.Image]:
    """Three small RGB images of different sizes and colours."""
    return [
        Image.new("RGB", (40, 30), (255, 0, 0)),
        Image.new("RGB", (64, 64), (0, 128, 255)),
        Image.new("RGB", (20, 50), (10, 200, 10)),
    ]
