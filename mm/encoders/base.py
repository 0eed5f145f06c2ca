"""What every vision encoder provides."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import nn

from mm.registry import Registry

ENCODERS: Registry = Registry("encoder")


@dataclass
class SizeOptions:
    """Options of an encoder whose only knob is its input size."""

    image_size: int | None = None  # input side in pixels (None: the encoder's own default)


class VisionEncoder(nn.Module):
    """A vision tower seen as a token grid.

    Contract: ``forward(pixel_values [B, 3, H, W]) -> tokens [B, N, D]`` where
    ``N = num_prefix_tokens + grid[0] * grid[1]``; prefix tokens (CLS, registers) come first, then the grid in
    raster (row-major) order. ``transform`` turns one RGB PIL image into the ``[3, H, W]`` tensor it expects.
    """

    dim: int  # D
    grid: tuple[int, int]  # token grid (rows, cols) after the prefix tokens
    num_prefix_tokens: int = 0
    image_size: int
    transform: Callable[[Image.Image], torch.Tensor]

    def save_files(self, directory: Path) -> bool:
        """Capability: write the files this encoder needs to be rebuilt without its source (its builder then
        gets ``saved=directory``). Returns whether it wrote any; most encoders need none."""
        return False

    def llava_problems(self) -> list[str]:
        """Capability: why this tower cannot become a transformers LLaVA vision tower (empty when it can)."""
        return [f"encoder {type(self).__name__} is not a transformers CLIP/SigLIP vision tower"]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]
