"""``pixel-shuffle``: InternVL's pixel shuffle 0.5 (also Mono-InternVL's visual tokenizer head).

Drop prefix tokens; each 2 x 2 block of neighbouring grid tokens is concatenated on channels in the block's
row-major order ``(r, c), (r, c+1), (r+1, c), (r+1, c+1)`` (InternVL's ``ps_version='v2'`` layout, so its
``mlp1`` weights fit), giving a ``rows/2 x cols/2`` grid in raster order; then
LayerNorm(4 Din) -> Linear(4 Din, h) -> GELU -> Linear(h, Dllm), ``h`` = option ``hidden`` or Dllm.
An odd grid side is padded by repeating its last row/column, so ``num_tokens = ceil(rows/2) * ceil(cols/2)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter, HiddenOptions
from mm.encoders.base import VisionEncoder


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """``[B, rows, cols, C]`` with even sides -> ``[B, rows/2 * cols/2, 4C]``, 2 x 2 blocks on channels."""
    batch, rows, cols, dim = x.shape
    x = x.reshape(batch, rows // 2, 2, cols // 2, 2, dim)  # [B, R/2, 2, C/2, 2, D]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [B, R/2, C/2, 2 (row in block), 2 (col in block), D]
    return x.reshape(batch, (rows // 2) * (cols // 2), 4 * dim)


class PixelShuffleAdapter(Adapter):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_prefix_tokens: int, grid: tuple[int, int]):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = grid
        self.num_tokens = ((grid[0] + 1) // 2) * ((grid[1] + 1) // 2)
        self.mlp = nn.Sequential(nn.LayerNorm(4 * in_dim), nn.Linear(4 * in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, N, Din] -> [B, ceil(r/2)*ceil(c/2), Dllm]
        x = tokens[:, self.num_prefix_tokens:]  # [B, rows*cols, Din]
        batch, _, dim = x.shape
        rows, cols = self.grid
        x = x.reshape(batch, rows, cols, dim)  # [B, rows, cols, Din]
        if rows % 2 or cols % 2:  # repeat the last row / column
            x = F.pad(x.permute(0, 3, 1, 2), (0, cols % 2, 0, rows % 2), mode="replicate").permute(0, 2, 3, 1)
        return self.mlp(pixel_shuffle(x))  # [B, M, Dllm]


@ADAPTERS.register("pixel-shuffle", options=HiddenOptions)
def build_pixel_shuffle(encoder: VisionEncoder, llm_dim: int, options: HiddenOptions) -> PixelShuffleAdapter:
    return PixelShuffleAdapter(encoder.dim, options.hidden or llm_dim, llm_dim, encoder.num_prefix_tokens,
                               tuple(encoder.grid))
