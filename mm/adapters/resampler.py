"""``resampler``: a Perceiver resampler (Flamingo) with option ``queries`` learned queries.

Prefix tokens are dropped; the grid tokens are projected to Dllm and given a learned position embedding (the
grid is fixed at build time). Each of ``depth`` layers lets the queries attend to ``[tokens; queries]``
(``torch.nn.MultiheadAttention``) and then runs an FFN, both pre-norm and residual; a final LayerNorm closes.
Output: ``[B, queries, Dllm]`` whatever the grid. FFN width: option ``hidden`` or 4 Dllm;
heads: Dllm / 64 rounded down to a divisor of Dllm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter
from mm.encoders.base import VisionEncoder
from mm.errors import MMError


@dataclass
class ResamplerOptions:
    queries: int = 64  # learned queries = tokens per image
    hidden: int | None = None  # FFN width (None: 4 x the LLM width)


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_hidden: int):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_hidden), nn.GELU(), nn.Linear(ffn_hidden, dim))

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:  # [B, N, D], [B, Q, D]
        query = self.norm_latents(latents)
        keys = torch.cat([self.norm_media(media), query], dim=1)  # [B, N + Q, D]
        latents = latents + self.attn(query, keys, keys, need_weights=False)[0]
        return latents + self.ffn(self.norm_ffn(latents))  # [B, Q, D]


class ResamplerAdapter(Adapter):
    def __init__(self, in_dim: int, out_dim: int, num_prefix_tokens: int, num_patches: int, num_queries: int,
                 depth: int = 2, ffn_hidden: int | None = None):
        super().__init__()
        heads = max(1, out_dim // 64)
        while out_dim % heads:
            heads -= 1
        self.num_prefix_tokens = num_prefix_tokens
        self.num_tokens = num_queries
        self.input_proj = nn.Linear(in_dim, out_dim)
        self.pos_embed = nn.Parameter(torch.randn(num_patches, out_dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(out_dim, heads, ffn_hidden or 4 * out_dim) for _ in range(depth))
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, N, Din] -> [B, Q, Dllm]
        media = self.input_proj(tokens[:, self.num_prefix_tokens:]) + self.pos_embed  # [B, rows*cols, Dllm]
        latents = self.queries.expand(media.shape[0], -1, -1)  # [B, Q, Dllm]
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm_out(latents)


@ADAPTERS.register("resampler", options=ResamplerOptions, example=lambda workdir: {"name": "resampler", "queries": 3})
def build_resampler(encoder: VisionEncoder, llm_dim: int, options: ResamplerOptions) -> ResamplerAdapter:
    queries = options.queries
    if queries < 1:
        raise MMError(f"resampler adapter queries must be a positive integer, got {queries!r}")
    return ResamplerAdapter(encoder.dim, llm_dim, encoder.num_prefix_tokens, encoder.grid[0] * encoder.grid[1],
                            queries, ffn_hidden=options.hidden)
