"""``pool``: the InfMLLM pool-adapter (arXiv 2311.06791).

LayerNorm(Din) -> drop prefix tokens -> the ``rows x cols`` grid -> adaptive average pooling to ``P x P``
(``P = config.pool_size``; equal to block averaging when the grid divides by P, and also covers the other case)
-> raster (row-major) order, which is how position survives -> Linear(Din, h) -> GELU -> Linear(h, Dllm),
``h = config.adapter_hidden`` or Dllm (the paper's d). Output: exactly ``P*P`` tokens per image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter
from mm.config import ModelConfig
from mm.encoders.base import VisionEncoder
from mm.errors import MMError


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


@ADAPTERS.register("pool")
def build_pool(encoder: VisionEncoder, llm_dim: int, config: ModelConfig) -> PoolAdapter:
    size = config.pool_size
    if not isinstance(size, int) or size < 1 or size > min(encoder.grid):
        raise MMError(f"pool_size {size!r} must be an integer from 1 to {min(encoder.grid)} "
                      f"(the encoder's grid is {encoder.grid[0]}x{encoder.grid[1]})")
    return PoolAdapter(encoder.dim, config.adapter_hidden or llm_dim, llm_dim, encoder.num_prefix_tokens,
                       tuple(encoder.grid), size)
