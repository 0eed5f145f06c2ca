"""Tiny random transformers vision towers saved to disk, and mm models built on them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import mm

ROOT = Path(__file__).resolve().parents[2]
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
             patch_size=8)


def save_tower(family: str, directory: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    config_cls, model_cls = {"clip": (CLIPVisionConfig, CLIPVisionModel),
                             "siglip": (SiglipVisionConfig, SiglipVisionModel)}[family]
    torch.manual_seed(1)
    model_cls(config_cls(**TOWER)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def towers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("towers")
    return {family: save_tower(family, root / family) for family in ("clip", "siglip")}


def _build_model(tower: Path, adapter: str, select_layer: int = -2) -> mm.MultimodalModel:
    """A tiny mm model whose adapter weights are large enough to move the logits (not near-zero init)."""
    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder={"name": f"hf:{tower}", "select_layer": select_layer}, adapter=adapter,
                                    llm="tiny-llama"))
    with torch.no_grad():
        for parameter in model.adapter.parameters():
            parameter.normal_(std=0.5)
    return model


def _run_tool(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="session")
def build_model():
    """``build_model(tower_dir, adapter, select_layer=-2)``."""
    return _build_model


def _tool_main(name: str):
    """The ``main(argv) -> exit code`` of ``tools/<name>``, loaded in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "tools" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="session")
def tool_main():
    """``tool_main("import_hf.py")([...])`` -> exit code, in process (a subprocess costs a full import)."""
    return _tool_main


@pytest.fixture(scope="session")
def run_tool():
    """``run_tool("export_hf.py", *args)`` -> CompletedProcess (a real subprocess)."""
    return _run_tool


@pytest.fixture()
def picture() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 128, 255))]
