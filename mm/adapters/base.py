"""What every adapter (projector) provides."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mm.registry import Registry

ADAPTERS: Registry = Registry("adapter")


@dataclass
class HiddenOptions:
    """Options of an MLP-style adapter."""

    hidden: int | None = None  # hidden width (None: the LLM width)


class Adapter(nn.Module):
    """Maps encoder tokens into the LLM embedding space.

    Contract: ``forward(tokens [B, N, Din]) -> [B, num_tokens, Dllm]``; ``num_tokens`` is fixed at build time
    from the encoder's grid, so the model can expand image placeholders before running the encoder.
    """

    num_tokens: int

    def llava_problems(self, llm_width: int) -> list[str]:
        """Capability: why this adapter cannot become LLaVA's ``multi_modal_projector`` (empty when it can)."""
        return [f"adapter {type(self).__name__} has no LLaVA projector equivalent"]

    def llava_projector(self, llm_width: int) -> tuple[str, dict]:
        """Capability: ``(projector_hidden_act, state dict of linear_1 / linear_2)`` of the equivalent LLaVA
        ``multi_modal_projector``; only parts registered with the ``llava`` capability implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not map onto LLaVA's projector")
