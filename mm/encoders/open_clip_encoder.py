"""``open_clip:<arch>``: the vision tower of an open_clip model (ViT towers only), as tokens before pooling.

Tokens are ``[B, 1 + rows*cols, width]``: the CLS token first, then the patch grid; ``width`` is the tower's
transformer width, i.e. *before* the contrastive projection ``proj`` (which is dropped). option ``select_layer``
indexes hidden states like transformers does (0 = embeddings, unsupported here; -1 = last block, -2 = the one
before): the last block gets the tower's own ``ln_post`` (what open_clip pools from), earlier blocks are raw
(LLaVA's penultimate-layer features). Blocks after the chosen one are removed.

Weights come only from option ``weights`` (a full open_clip checkpoint file); ``pretrained=True`` without
it is an error rather than a silent random init. Preprocessing is open_clip's eval preprocess for the arch.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import torch
from torch import nn

from mm.encoders.base import ENCODERS, VisionEncoder
from mm.errors import MMError


@dataclass
class OpenClipOptions:
    image_size: int | None = None  # force the tower's input size (position embeddings resampled)
    select_layer: int = -1  # hidden state to take: -1 last block (with ln_post), -2 the one before, ...
    weights: str | None = None  # a full open_clip checkpoint file (required for pretrained weights)


class OpenClipEncoder(VisionEncoder):
    """Wraps an open_clip ``VisionTransformer``; ``block`` is the absolute index of the block whose output is used."""

    def __init__(self, visual: nn.Module, block: int, transform):
        super().__init__()
        last = len(visual.transformer.resblocks) - 1
        visual.prune_intermediate_layers([block], prune_norm=block != last, prune_head=True)
        self.visual = visual
        self.block = block
        self.normalize = block == last
        self.transform = transform
        self.image_size = visual.image_size[1]
        self.grid = tuple(visual.grid_size)
        self.dim = visual.transformer.width
        self.num_prefix_tokens = 1  # open_clip always prepends its class embedding

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, 1 + N, width]
        out = self.visual.forward_intermediates(
            pixel_values, indices=[self.block], stop_early=True, normalize_intermediates=self.normalize,
            intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
        prefix = out["image_intermediates_prefix"][0]  # [B, 1, width]
        patches = out["image_intermediates"][0]  # [B, N, width]
        return torch.cat([prefix, patches], dim=1)


TINY_ARCH = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                            "patch_size": 8},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


def example(workdir) -> dict:
    """A tiny open_clip architecture (added to open_clip's registry) with random weights under ``workdir``."""
    import json
    from pathlib import Path

    import open_clip
    from safetensors.torch import save_file

    arch = Path(workdir) / "mm-example-tiny-clip.json"
    arch.write_text(json.dumps(TINY_ARCH))
    open_clip.add_model_config(arch)
    weights = Path(workdir) / "mm-example-tiny-clip.safetensors"
    save_file(open_clip.create_model(arch.stem).state_dict(), str(weights))
    return {"name": f"open_clip:{arch.stem}", "weights": str(weights)}


@ENCODERS.register("open_clip", options=OpenClipOptions, example=example)
def build_open_clip(arg: str | None, options: OpenClipOptions, pretrained: bool, saved=None) -> OpenClipEncoder:
    """``open_clip:<arch>`` (a built-in or ``open_clip.add_model_config`` name)."""
    import open_clip  # deferred: importing open_clip costs seconds
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from open_clip.transformer import VisionTransformer

    if not arg:
        raise MMError("open_clip encoder needs an architecture, e.g. open_clip:ViT-B-32")
    if ":" in arg:
        raise MMError(f"open_clip:{arg}: hub and local-dir schemas are not supported; name an architecture "
                      "and pass its checkpoint file as model.encoder.weights")
    if arg not in open_clip.list_models():
        raise MMError(f"unknown open_clip architecture {arg!r} (see open_clip.list_models())")
    checkpoint = None
    if pretrained:
        if not options.weights:
            raise MMError(f"open_clip:{arg} has no local weights (downloads are off): pass model.encoder.weights=<checkpoint "
                          "file>, or build untrained on purpose with pretrained=False")
        if not os.path.isfile(options.weights):  # a non-file would be taken as a download tag
            raise MMError(f"encoder weights {options.weights} is not a file")
        checkpoint = options.weights
    try:
        model = open_clip.create_model(
            arg, pretrained=checkpoint, force_image_size=options.image_size, force_patch_dropout=0.0,
            pretrained_image=False, pretrained_text=False, require_pretrained=pretrained, weights_only=True)
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as exc:
        raise MMError(f"cannot build open_clip:{arg}: {' '.join(str(exc).split())[:300]}") from None
    visual = model.visual
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        raise MMError(f"open_clip:{arg} has a {type(visual).__name__} vision tower with its own pooling; only "
                      "plain ViT towers are supported (timm models go through the timm: encoder)")
    transform = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)
    num_blocks = len(visual.transformer.resblocks)
    layer = options.select_layer
    if not -(num_blocks + 1) <= layer <= num_blocks:
        raise MMError(f"select_layer {layer} out of range for open_clip:{arg} with {num_blocks} blocks")
    layer %= num_blocks + 1  # hidden-state index: 0 = embeddings, k = output of block k-1
    if layer == 0:
        raise MMError("select_layer 0 (patch embeddings) is not supported for open_clip encoders")
    return OpenClipEncoder(visual, layer - 1, transform)
