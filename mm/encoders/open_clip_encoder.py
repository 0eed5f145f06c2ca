"""``open_clip:<arch>``: the vision tower of an open_clip model (ViT towers only), as tokens before pooling.

Tokens are ``[B, 1 + rows*cols, width]``: the CLS token first, then the patch grid; ``width`` is the tower's
transformer width, i.e. *before* the contrastive projection ``proj`` (which is dropped). ``config.select_layer``
indexes hidden states like transformers does (0 = embeddings, unsupported here; -1 = last block, -2 = the one
before): the last block gets the tower's own ``ln_post`` (what open_clip pools from), earlier blocks are raw
(LLaVA's penultimate-layer features). Blocks after the chosen one are removed.

Weights come only from ``config.encoder_path`` (a full open_clip checkpoint file); ``pretrained=True`` without
it is an error rather than a silent random init. Preprocessing is open_clip's eval preprocess for the arch.
"""
from __future__ import annotations

import os
import pickle

import torch
from torch import nn

from mm.config import ModelConfig
from mm.encoders.base import ENCODERS, VisionEncoder
from mm.errors import MMError


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


@ENCODERS.register("open_clip")
def build_open_clip(arg: str | None, config: ModelConfig, pretrained: bool) -> OpenClipEncoder:
    """``open_clip:<arch>`` (a built-in or ``open_clip.add_model_config`` name)."""
    import open_clip  # deferred: importing open_clip costs seconds
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from open_clip.transformer import VisionTransformer

    if not arg:
        raise MMError("open_clip encoder needs an architecture, e.g. open_clip:ViT-B-32")
    if ":" in arg:
        raise MMError(f"open_clip:{arg}: hub and local-dir schemas are not supported; name an architecture "
                      "and pass its checkpoint file as encoder_path")
    if arg not in open_clip.list_models():
        raise MMError(f"unknown open_clip architecture {arg!r} (see open_clip.list_models())")
    checkpoint = None
    if pretrained:
        if not config.encoder_path:
            raise MMError(f"open_clip:{arg} has no local weights (downloads are off): pass encoder_path=<checkpoint "
                          "file>, or build untrained on purpose with pretrained=False")
        if not os.path.isfile(config.encoder_path):  # a non-file would be taken as a download tag
            raise MMError(f"encoder_path {config.encoder_path} is not a file")
        checkpoint = config.encoder_path
    try:
        model = open_clip.create_model(
            arg, pretrained=checkpoint, force_image_size=config.image_size, force_patch_dropout=0.0,
            pretrained_image=False, pretrained_text=False, require_pretrained=pretrained, weights_only=True)
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as exc:
        raise MMError(f"cannot build open_clip:{arg}: {' '.join(str(exc).split())[:300]}") from None
    visual = model.visual
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        raise MMError(f"open_clip:{arg} has a {type(visual).__name__} vision tower with its own pooling; only "
                      "plain ViT towers are supported (timm models go through the timm: encoder)")
    transform = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)
    num_blocks = len(visual.transformer.resblocks)
    layer = config.select_layer
    if not -(num_blocks + 1) <= layer <= num_blocks:
        raise MMError(f"select_layer {layer} out of range for open_clip:{arg} with {num_blocks} blocks")
    layer %= num_blocks + 1  # hidden-state index: 0 = embeddings, k = output of block k-1
    if layer == 0:
        raise MMError("select_layer 0 (patch embeddings) is not supported for open_clip encoders")
    return OpenClipEncoder(visual, layer - 1, transform)
