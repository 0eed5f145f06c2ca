"""``mlp``: LLaVA-1.5's projector, Linear(Din, h) -> GELU -> Linear(h, Dllm) per patch token.

``h = config.adapter_hidden`` or Dllm (LLaVA-1.5's mlp2x_gelu). Prefix tokens are dropped:
``[B, prefix + rows*cols, Din] -> [B, rows*cols, Dllm]``.
"""
from __future__ import annotations

import torch
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter
from mm.config import ModelConfig
from mm.encoders.base import VisionEncoder


class MLPAdapter(Adapter):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_prefix_tokens: int, num_tokens: int):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.num_tokens = num_tokens
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, N, Din] -> [B, M, Dllm]
        return self.mlp(tokens[:, self.num_prefix_tokens:])


@ADAPTERS.register("mlp")
def build_mlp(encoder: VisionEncoder, llm_dim: int, config: ModelConfig) -> MLPAdapter:
    return MLPAdapter(encoder.dim, config.adapter_hidden or llm_dim, llm_dim, encoder.num_prefix_tokens,
                      encoder.grid[0] * encoder.grid[1])
