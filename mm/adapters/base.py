"""What every adapter (projector) provides."""
from __future__ import annotations

from torch import nn

from mm.registry import Registry

ADAPTERS: Registry = Registry("adapter")


class Adapter(nn.Module):
    """Maps encoder tokens into the LLM embedding space.

    Contract: ``forward(tokens [B, N, Din]) -> [B, num_tokens, Dllm]``; ``num_tokens`` is fixed at build time
    from the encoder's grid, so the model can expand image placeholders before running the encoder.
    """

    num_tokens: int
