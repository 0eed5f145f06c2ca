"""``patch``: Mono-InternVL's monolithic visual tokenizer: a Conv2d patch embedding plus a learned position
embedding, no ViT, no CLS token. It is trained from scratch (EViP), so ``pretrained`` changes nothing.

``patch`` or ``patch:<width>`` (default width 1024). Kernel = stride = 14; option ``image_size`` (default 448,
a multiple of 14) fixes the grid: 448 px -> 32 x 32 tokens (-> 16 x 16 = 256 after ``pixel-shuffle``).
The position table has the build grid; inputs of another size get it bicubically interpolated.
Transform: resize to ``image_size`` (bicubic), ImageNet mean/std normalisation, as InternVL.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from mm.encoders.base import ENCODERS, SizeOptions, VisionEncoder
from mm.errors import MMError

PATCH = 14
DEFAULT_SIZE = 448
DEFAULT_WIDTH = 1024
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PatchEncoder(VisionEncoder):
    def __init__(self, width: int = DEFAULT_WIDTH, image_size: int = DEFAULT_SIZE, patch: int = PATCH):
        super().__init__()
        if image_size < patch or image_size % patch:
            raise MMError(f"patch encoder: image_size {image_size} must be a multiple of the patch size {patch}")
        self.dim, self.patch, self.image_size = width, patch, image_size
        self.grid = (image_size // patch, image_size // patch)
        self.num_prefix_tokens = 0
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], width))  # [1, G*G, D]
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.transform = transforms.Compose([
            transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ])

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:  # -> [1, rows*cols, D]
        if (rows, cols) == self.grid:
            return self.pos_embed
        table = self.pos_embed.reshape(1, *self.grid, self.dim).permute(0, 3, 1, 2)  # [1, D, G, G]
        table = F.interpolate(table.float(), size=(rows, cols), mode="bicubic", align_corners=False)
        return table.to(self.pos_embed.dtype).flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, H/14 * W/14, D]
        x = self.patch_embed(pixel_values)  # [B, D, rows, cols]
        rows, cols = x.shape[-2:]
        return x.flatten(2).transpose(1, 2) + self.position_embedding(rows, cols)


@ENCODERS.register("patch", options=SizeOptions, example=lambda workdir: {"name": "patch:16", "image_size": 28})
def build_patch(arg: str | None, options: SizeOptions, pretrained: bool, saved=None) -> PatchEncoder:
    try:
        width = int(arg) if arg else DEFAULT_WIDTH
    except ValueError:
        raise MMError(f"patch encoder: 'patch:{arg}' needs an integer width, e.g. patch:1024") from None
    if width < 1:
        raise MMError(f"patch encoder: width must be positive, got {width}")
    return PatchEncoder(width, options.image_size or DEFAULT_SIZE)
