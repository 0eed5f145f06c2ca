"""``linear``: one Linear(Din, Dllm) per patch token (LLaVA-1.0).

Like every adapter here, it drops the encoder's prefix tokens (CLS, registers) and keeps the grid, as LLaVA
does with ``select_feature='patch'``: ``[B, prefix + rows*cols, Din] -> [B, rows*cols, Dllm]``.
"""
from __future__ import annotations

import torch
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter
from mm.encoders.base import VisionEncoder


class LinearAdapter(Adapter):
    def __init__(self, in_dim: int, out_dim: int, num_prefix_tokens: int, num_tokens: int):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.num_tokens = num_tokens
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, N, Din] -> [B, M, Dllm]
        return self.proj(tokens[:, self.num_prefix_tokens:])

    def llava_problems(self, llm_width: int) -> list[str]:
        return []

    def llava_projector(self, llm_width: int) -> tuple[str, dict]:
        """``linear_1`` = this projection; ``linear_2`` = identity with zero bias (exact: x @ I^T + 0 == x) under
        the identity activation ``"linear"``."""
        weight = self.proj.weight.detach()
        return "linear", {"linear_1.weight": weight, "linear_1.bias": self.proj.bias.detach(),
                          "linear_2.weight": torch.eye(llm_width, dtype=weight.dtype),
                          "linear_2.bias": torch.zeros(llm_width, dtype=weight.dtype)}


@ADAPTERS.register("linear", capabilities=("llava",))
def build_linear(encoder: VisionEncoder, llm_dim: int, options) -> LinearAdapter:
    return LinearAdapter(encoder.dim, llm_dim, encoder.num_prefix_tokens, encoder.grid[0] * encoder.grid[1])
