"""``hf:<local dir>``: a transformers CLIP or SigLIP vision tower from a local directory.

The directory may hold a vision-only model (``clip_vision_model`` / ``siglip_vision_model``) or a full CLIP /
SigLIP model, whose vision tower is taken. Tokens are ``hidden_states[config.select_layer]`` (0 = embeddings,
-1 = last layer, -2 = LLaVA's penultimate), raw: no post-layernorm. CLIP has one CLS prefix token, SigLIP
none. Layers after the chosen one, the post-layernorm and SigLIP's pooling head are removed (they would be
unused parameters). Preprocessing is the directory's image processor, else the family's default processor
(CLIP: OpenAI CLIP mean/std, resize + center crop; SigLIP: mean/std 0.5, square resize) at the model's size.
``config.image_size`` overrides the size; position embeddings are then interpolated.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mm.config import ModelConfig
from mm.encoders.base import ENCODERS, VisionEncoder
from mm.errors import MMError

_FAMILIES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}


class HFVisionEncoder(VisionEncoder):
    """Wraps a transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` already cut at the chosen layer."""

    def __init__(self, model: nn.Module, num_prefix_tokens: int, image_size: int, processor):
        super().__init__()
        self.model = model
        self.num_prefix_tokens = num_prefix_tokens
        self.image_size = image_size
        self.interpolate = image_size != model.config.image_size
        side = image_size // model.config.patch_size
        self.grid = (side, side)
        self.dim = model.config.hidden_size
        self.processor = processor

    def save_config(self, directory: Path) -> None:
        """Write what ``hf:<directory>`` with ``pretrained=False`` needs to rebuild this tower (no weights)."""
        self.model.config.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    def transform(self, image) -> torch.Tensor:  # PIL RGB -> [3, H, W]
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, N, D]
        out = self.model(pixel_values=pixel_values, output_hidden_states=True,
                         interpolate_pos_encoding=self.interpolate)
        return out.hidden_states[-1]  # the tower ends at the chosen layer


def _processor(path: Path, family: str, size: int, override: bool):
    from transformers import AutoImageProcessor, CLIPImageProcessor, SiglipImageProcessor

    if family == "clip":
        sizes = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    else:
        sizes = {"size": {"height": size, "width": size}}
    if (path / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(path, **(sizes if override else {}))
    return (CLIPImageProcessor if family == "clip" else SiglipImageProcessor)(**sizes)


def _load(model_cls, path: Path, vision_config) -> nn.Module:
    """Load weights; every tower tensor must be present (unexpected ones, e.g. a text tower, are ignored)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would list every skipped text-tower tensor
    try:
        model, info = model_cls.from_pretrained(path, config=vision_config, dtype=torch.float32,
                                                output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise MMError(f"hf encoder: cannot load weights from {path}: {' '.join(str(exc).split())[:300]}") from None
    finally:
        hf_logging.set_verbosity(previous)
    missing = sorted(info["missing_keys"])
    if missing:
        raise MMError(f"hf encoder: {path} lacks weights for {len(missing)} tensors, e.g. {missing[0]}")
    return model


def _cut(model: nn.Module, family: str, layer: int) -> None:
    """Keep hidden states up to index ``layer`` (0 = embeddings) and drop the unused pooling parts."""
    tower = getattr(model, "vision_model", model)  # transformers < 5 nests the tower one level deeper
    tower.encoder.layers = tower.encoder.layers[:layer]
    tower.post_layernorm = nn.Identity()
    if family == "siglip":
        tower.head = None
        tower.use_head = False


@ENCODERS.register("hf")
def build_hf(arg: str | None, config: ModelConfig, pretrained: bool) -> HFVisionEncoder:
    """``hf:<dir>`` with a transformers ``config.json``; ``pretrained=False`` builds from that config only."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    if not arg:
        raise MMError("hf encoder needs a local model directory, e.g. hf:/models/clip-vit-large-patch14")
    path = Path(arg)
    if not (path / "config.json").is_file():
        raise MMError(f"hf encoder: {path} is not a model directory (no config.json)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    family = _FAMILIES.get(model_type)
    if family is None:
        raise MMError(f"hf encoder: model_type {model_type!r} in {path} is not supported; "
                      f"supported: {', '.join(_FAMILIES)}")
    config_cls, model_cls = {"clip": (CLIPVisionConfig, CLIPVisionModel),
                             "siglip": (SiglipVisionConfig, SiglipVisionModel)}[family]
    vision_config = config_cls.from_pretrained(path)  # takes vision_config out of full-model configs
    if family == "siglip":
        vision_config.vision_use_head = False
    if pretrained:
        model = _load(model_cls, path, vision_config)
    else:
        model = model_cls(vision_config)

    num_layers = vision_config.num_hidden_layers
    layer = config.select_layer
    if not -(num_layers + 1) <= layer <= num_layers:
        raise MMError(f"select_layer {layer} out of range for {path} with {num_layers} layers")
    _cut(model, family, layer % (num_layers + 1))
    size = config.image_size or vision_config.image_size
    processor = _processor(path, family, size, override=config.image_size is not None)
    return HFVisionEncoder(model, 1 if family == "clip" else 0, size, processor)
