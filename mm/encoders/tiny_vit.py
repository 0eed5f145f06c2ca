"""``tiny-vit``: a random-init ViT for tests (timm's VisionTransformer, so no attention written here).

32 px images (``image_size`` option overrides), patch 8 -> 4 x 4 grid + 1 CLS token, width 32, 2 blocks.
Initialisation draws from torch's global RNG, so it is deterministic under ``torch.manual_seed``. There are no
weights to load: ``pretrained`` is ignored.
"""
from __future__ import annotations

from timm.models import VisionTransformer

from mm.encoders.base import ENCODERS, SizeOptions
from mm.encoders.timm_encoder import TimmEncoder


@ENCODERS.register("tiny-vit", options=SizeOptions)
def build_tiny_vit(arg: str | None, options: SizeOptions, pretrained: bool, saved=None) -> TimmEncoder:
    size = options.image_size or 32
    model = VisionTransformer(img_size=size, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                              num_classes=0)
    data_config = {"input_size": (3, size, size), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
                   "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "crop_mode": "center"}
    return TimmEncoder(model, data_config)
