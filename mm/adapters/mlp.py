"""``mlp``: LLaVA-1.5's projector, Linear(Din, h) -> GELU -> Linear(h, Dllm) per patch token.

``h`` = option ``hidden`` or Dllm (LLaVA-1.5's mlp2x_gelu). Prefix tokens are dropped:
``[B, prefix + rows*cols, Din] -> [B, rows*cols, Dllm]``.
"""
from __future__ import annotations

import torch
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter, HiddenOptions
from mm.encoders.base import VisionEncoder


class MLPAdapter(Adapter):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_prefix_tokens: int, num_tokens: int):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.num_tokens = num_tokens
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, N, Din] -> [B, M, Dllm]
        return self.mlp(tokens[:, self.num_prefix_tokens:])

    def llava_problems(self, llm_width: int) -> list[str]:
        hidden = self.mlp[0].out_features
        if hidden != llm_width:
            return [f"mlp adapter hidden width {hidden} differs from the LLM width {llm_width} (LLaVA's "
                    "projector hidden width is the LLM width)"]
        return []

    def llava_projector(self, llm_width: int) -> tuple[str, dict]:
        first, second = self.mlp[0], self.mlp[2]
        return "gelu", {"linear_1.weight": first.weight.detach(), "linear_1.bias": first.bias.detach(),
                        "linear_2.weight": second.weight.detach(), "linear_2.bias": second.bias.detach()}


@ADAPTERS.register("mlp", options=HiddenOptions, capabilities=("llava",),
                    example=lambda workdir: {"name": "mlp", "hidden": 24})
def build_mlp(encoder: VisionEncoder, llm_dim: int, options: HiddenOptions) -> MLPAdapter:
    return MLPAdapter(encoder.dim, options.hidden or llm_dim, llm_dim, encoder.num_prefix_tokens,
                      encoder.grid[0] * encoder.grid[1])
