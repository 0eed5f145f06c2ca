"""``pool``: the InfMLLM pool-adapter (arXiv 2311.06791).

LayerNorm(Din) -> drop prefix tokens -> the ``rows x cols`` grid -> adaptive average pooling to ``P x P``
(``P`` = option ``size``; equal to block averaging when the grid divides by P, and also covers the other case)
-> raster (row-major) order, which is how position survives -> Linear(Din, h) -> GELU -> Linear(h, Dllm),
``h`` = option ``hidden`` or Dllm (the paper's d). Output: exactly ``P*P`` tokens per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter
from mm.encoders.base import VisionEncoder
from mm.errors import MMError


@dataclass
class PoolOptions:
    size: int = 7  # P: the adapter gives P*P tokens per image
    hidden: int | None = None  # MLP hidden width (None: the LLM width)


class PoolAdapter(Adapter):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_prefix_tokens: int, grid: tuple[int, int],
                 pool_size: int):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = grid
        self.pool_size = pool_size
        self.num_tokens = pool_size * pool_size
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, N, Din] -> [B, P*P, Dllm]
        x = self.norm(tokens)[:, self.num_prefix_tokens:]  # [B, rows*cols, Din]
        batch, _, dim = x.shape
        x = x.transpose(1, 2).reshape(batch, dim, *self.grid)  # [B, Din, rows, cols]
        x = F.adaptive_avg_pool2d(x, self.pool_size)  # [B, Din, P, P]
        x = x.flatten(2).transpose(1, 2)  # [B, P*P, Din], row-major
        return self.mlp(x)


@ADAPTERS.register("pool", options=PoolOptions, example=lambda workdir: {"name": "pool", "size": 2})
def build_pool(encoder: VisionEncoder, llm_dim: int, options: PoolOptions) -> PoolAdapter:
    size = options.size
    if size < 1 or size > min(encoder.grid):
        raise MMError(f"pool adapter size {size!r} must be an integer from 1 to {min(encoder.grid)} "
                      f"(the encoder's grid is {encoder.grid[0]}x{encoder.grid[1]})")
    return PoolAdapter(encoder.dim, options.hidden or llm_dim, llm_dim, encoder.num_prefix_tokens,
                       tuple(encoder.grid), size)
