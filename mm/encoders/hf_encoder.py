"""``hf:<local dir>``: a transformers CLIP or SigLIP vision tower from a local directory.

The directory may hold a vision-only model (``clip_vision_model`` / ``siglip_vision_model``) or a full CLIP /
SigLIP model, whose vision tower is taken. Tokens are ``hidden_states[select_layer]`` (0 = embeddings,
-1 = last layer, -2 = LLaVA's penultimate), raw: no post-layernorm. CLIP has one CLS prefix token, SigLIP
none. Layers after the chosen one, the post-layernorm and SigLIP's pooling head are removed (they would be
unused parameters). Preprocessing is the directory's image processor, else the family's default processor
(CLIP: OpenAI CLIP mean/std, resize + center crop; SigLIP: mean/std 0.5, square resize) at the model's size.
Option ``image_size`` overrides the size; position embeddings are then interpolated.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mm.encoders.base import ENCODERS, VisionEncoder
from mm.errors import MMError

@dataclass
class HFEncoderOptions:
    image_size: int | None = None  # input side (position embeddings interpolated when it differs)
    select_layer: int = -1  # hidden state to take: 0 embeddings, -1 last layer, -2 LLaVA's penultimate


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

    def save_files(self, directory: Path) -> bool:
        """The tower's config and image processor (no weights): the builder rebuilds from them (``saved``)."""
        self.model.config.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        return True

    def llava_problems(self) -> list[str]:
        if self.interpolate:
            return [f"image_size {self.image_size} differs from the vision tower's {self.model.config.image_size} "
                    "(LLaVA does not interpolate position embeddings)"]
        if self.num_prefix_tokens not in (0, 1):
            return [f"the encoder has {self.num_prefix_tokens} prefix tokens; LLaVA drops 0 or 1"]
        return []

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
        return AutoImageProcessor.from_pretrained(path, trust_remote_code=False, **(sizes if override else {}))
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


def example(workdir: Path) -> dict:
    """A tiny random CLIP vision tower saved under ``workdir``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path = Path(workdir) / "hf-tiny-clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(path)
    return {"name": f"hf:{path}", "select_layer": -2}


@ENCODERS.register("hf", options=HFEncoderOptions, capabilities=("llava",), example=example)
def build_hf(arg: str | None, options: HFEncoderOptions, pretrained: bool, saved: Path | None = None
             ) -> HFVisionEncoder:
    """``hf:<dir>`` with a transformers ``config.json``; ``pretrained=False`` builds from that config only.
    ``saved``: a directory written by ``save_files``, used instead of ``<dir>`` (rebuilding a saved model)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    from mm.llm.base import read_json_object, refuse_remote_code

    if saved is not None:
        arg, pretrained = str(saved), False
    if not arg:
        raise MMError("hf encoder needs a local model directory, e.g. hf:/models/clip-vit-large-patch14")
    path = Path(arg)
    if not (path / "config.json").is_file():
        raise MMError(f"hf encoder: {path} is not a model directory (no config.json)")
    model_type = read_json_object(path / "config.json").get("model_type")
    refuse_remote_code(path)  # config.json, preprocessor_config.json: no auto_map
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
    layer = options.select_layer
    if not -(num_layers + 1) <= layer <= num_layers:
        raise MMError(f"select_layer {layer} out of range for {path} with {num_layers} layers")
    _cut(model, family, layer % (num_layers + 1))
    size = options.image_size or vision_config.image_size
    processor = _processor(path, family, size, override=options.image_size is not None)
    return HFVisionEncoder(model, 1 if family == "clip" else 0, size, processor)
