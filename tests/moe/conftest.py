"""Shared builders for the modality-expert tests: tiny random LLMs + the monolithic ``patch`` encoder."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import mm

# One tiny LLM per declared layout (mm/moe/layouts.py; test_layouts checks none is missing).
FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-phi3", "tiny-gpt2", "tiny-opt"]


def build(llm: str = "tiny-llama", moe: mm.MoEConfig | None = None, seed: int = 0, **config) -> mm.MultimodalModel:
    """Same seed -> same encoder/adapter/LLM weights, with or without experts."""
    options = dict(encoder={"name": "patch:32", "image_size": 56}, adapter="pixel-shuffle")
    options.update(config)
    torch.manual_seed(seed)
    return mm.build(mm.ModelConfig(llm=llm, moe=moe, **options))


def image(seed: int, size: int = 60) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy())


def conversations():
    """Two rows of different lengths (left padding), images in the middle and at the end, text around them."""
    first = [{"role": "user", "content": [{"type": "text", "text": "describe the big red circle"}, {"type": "image"},
                                           {"type": "text", "text": "and this one"}, {"type": "image"}]}]
    second = [{"role": "user", "content": [{"type": "text", "text": "how many"}, {"type": "image"},
                                            {"type": "text", "text": "shapes are there in the image"}]}]
    return [(first, [image(1), image(2)]), (second, [image(3)])]


def mixed_batch(model: mm.MultimodalModel) -> dict[str, torch.Tensor]:
    return model.collate(conversations())


def perturb(module: torch.nn.Module, seed: int = 1, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * parameter.std())


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # a shared 2-core machine
