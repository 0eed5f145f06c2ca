"""``anyres``: LLaVA-NeXT's AnyRes.

Candidate grids ``(cols, rows)`` (LLaVA-NeXT's ``image_grid_pinpoints`` divided by the tile size; default its
336 x {672, ...} list). For each, with the grid's pixel size ``w x h`` and the image's ``W x H``:
``scale = min(w / W, h / H)``, effective = ``min(int(W * scale) * int(H * scale), W * H)``, waste = ``w * h -
effective``; the largest effective resolution wins, ties to the least waste, then to the earlier grid. The image
is resized keeping its aspect ratio, centred on black to the grid's size and cut into tiles; the base image (the
whole image resized to one tile) comes first. A tile budget drops the grids that do not fit (the base image
counts); when none fits, the base image alone is the one tile.

``arrangement`` orders the tokens: ``tiles`` (default) puts each grid row's tiles side by side with the
tokenizer's newline after every row, the base image and a newline first. ``llava_next`` is transformers'
``LlavaNextForConditionalGeneration`` exactly: resizing and padding as ``LlavaNextImageProcessor`` (torchvision
bicubic with antialias on uint8 pixels, zero padding), then the base image's tokens with no separator, then the
grid's patch features re-assembled into one feature map, cropped of the rows or columns that are padding
(transformers' ``unpad_image``) and read row by row, a newline after each row of patches. The newline is the
tokenizer's (LLaVA-NeXT's ``image_newline`` vector is its embedding on export); the adapter must keep the
encoder's square patch grid (``tokens_per_tile`` = side * side), as ``mlp`` and ``linear`` do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from mm.errors import MMError
from mm.layouts.base import LAYOUTS, Layout, TiledImage, check_budget
from mm.layouts.dynamic import cut

LLAVA_NEXT_GRIDS = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]  # llava-v1.6: [[336, 672], [672, 336], ...] / 336


@dataclass
class AnyResOptions:
    grids: list[list[int]] = field(default_factory=lambda: [list(g) for g in LLAVA_NEXT_GRIDS])  # [cols, rows]
    max_image_tokens: int | None = None  # per document: tiles, base images and separators of all its images
    arrangement: Literal["tiles", "llava_next"] = "tiles"  # token order (module docstring)


def best_resolution(width: int, height: int, resolutions: list[tuple[int, int]]) -> tuple[int, int]:
    """LLaVA-NeXT's ``select_best_resolution`` over ``(w, h)`` candidates for a ``width x height`` image."""
    best, best_effective, best_waste = resolutions[0], 0, float("inf")
    for w, h in resolutions:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (w, h), effective, waste
    return best


def resize_and_pad(image: Image.Image, w: int, h: int) -> Image.Image:
    """LLaVA-NeXT's ``resize_and_pad_image``: fit inside ``w x h`` keeping the aspect ratio, centre on black."""
    width, height = image.size
    if w / width < h / height:
        new_w, new_h = w, min(math.ceil(height * w / width), h)
    else:
        new_w, new_h = min(math.ceil(width * h / height), w), h
    canvas = Image.new("RGB", (w, h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h)), ((w - new_w) // 2, (h - new_h) // 2))
    return canvas


@dataclass
class LlavaNextTiles(TiledImage):
    """An image in LLaVA-NeXT's arrangement: the base image (``thumbnail``) then the grid, whose patch features
    are re-assembled, unpadded to ``size`` (the original ``(width, height)``) and read row by row."""

    size: tuple[int, int] = (1, 1)

    def feature_map(self, tokens_per_tile: int) -> list[list[int]]:
        """The grid's features as LlavaNext reads them: rows of indices into this image's features (the base
        image's ``tokens_per_tile`` first, then each tile's), the tiles' patch grids joined into one map and cut
        to the original aspect ratio (transformers' ``unpad_image``)."""
        import torch
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        side = math.isqrt(tokens_per_tile)
        if side * side != tokens_per_tile:
            raise MMError(f"layout anyres arrangement llava_next needs a square patch grid per tile; the adapter "
                          f"gives {tokens_per_tile} tokens per tile")
        cols, rows = self.grid
        index = torch.arange(tokens_per_tile, tokens_per_tile * (1 + cols * rows))  # grid tiles' features
        index = index.view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(1, rows * side, cols * side)
        return unpad_image(index, (self.size[1], self.size[0]))[0].tolist()  # [rows', cols']

    def token_ids(self, tokens_per_tile: int, image_id: int, newline_id: int) -> list[int]:
        rows = self.feature_map(tokens_per_tile)
        return [image_id] * tokens_per_tile + [i for row in rows for i in [image_id] * len(row) + [newline_id]]

    def feature_order(self, tokens_per_tile: int) -> list[int]:
        return list(range(tokens_per_tile)) + [i for row in self.feature_map(tokens_per_tile) for i in row]


def _resize(pixels, height: int, width: int):  # uint8 [3, H, W] -> [3, h, w]
    from torchvision.transforms.v2 import functional as tvF

    return tvF.resize(pixels, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def _pil(pixels) -> Image.Image:  # uint8 [3, h, w] tensor -> RGB
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def llava_next_tiles(image: Image.Image, grid: tuple[int, int] | None, tile_size: int) -> TiledImage:
    """``image`` as ``LlavaNextImageProcessor`` (``resample`` bicubic) cuts it for ``grid`` (None: the base only)."""
    from torchvision.transforms.v2 import functional as tvF
    from transformers.image_processing_utils import get_patch_output_size
    from transformers.image_utils import ChannelDimension

    pixels = tvF.pil_to_tensor(image.convert("RGB"))  # [3, H, W] uint8
    base = _pil(_resize(pixels, tile_size, tile_size))
    if grid is None:
        return TiledImage([base])
    cols, rows = grid
    w, h = cols * tile_size, rows * tile_size
    new_h, new_w = get_patch_output_size(pixels, (h, w), ChannelDimension.FIRST)
    left, top = (w - new_w) // 2, (h - new_h) // 2
    padded = tvF.pad(_resize(pixels, new_h, new_w), [left, top, w - new_w - left, h - new_h - top])  # [3, h, w]
    tiles = [_pil(padded[:, r * tile_size:(r + 1) * tile_size, c * tile_size:(c + 1) * tile_size])
             for r in range(rows) for c in range(cols)]
    return LlavaNextTiles(tiles, grid, base, thumbnail_first=True, size=image.size)


class AnyResLayout(Layout):
    def __init__(self, options: AnyResOptions):
        self.grids = [tuple(grid) for grid in options.grids]
        self.max_image_tokens = options.max_image_tokens
        self.arrangement = options.arrangement
        self.rearranges_features = options.arrangement == "llava_next"

    def llava_next_problems(self) -> list[str]:
        """Capability ``llava_next``: why this layout's token stream is not LlavaNext's (empty when it is)."""
        problems = []
        if self.arrangement != "llava_next":
            problems.append(f"layout anyres arrangement {self.arrangement!r} differs from LlavaNext's token order "
                            "(base image, then the unpadded grid's patch rows, each followed by a newline; train "
                            "with arrangement llava_next)")
        if self.max_image_tokens is not None:
            problems.append("layout anyres max_image_tokens has no LlavaNext equivalent (LlavaNext always takes "
                            "the best grid)")
        return problems

    def __call__(self, image: Image.Image, tile_size: int, budget_tiles: int | None = None) -> TiledImage:
        grids = [g for g in self.grids if budget_tiles is None or g[0] * g[1] + 1 <= budget_tiles]
        grid = None
        if grids:
            w, h = best_resolution(*image.size, [(cols * tile_size, rows * tile_size) for cols, rows in grids])
            grid = (w // tile_size, h // tile_size)
        if self.arrangement == "llava_next":
            return llava_next_tiles(image, grid, tile_size)
        base = image.resize((tile_size, tile_size))
        if grid is None:
            return TiledImage([base])
        w, h = grid[0] * tile_size, grid[1] * tile_size
        return TiledImage(cut(resize_and_pad(image, w, h), grid, tile_size), grid, base, thumbnail_first=True)


@LAYOUTS.register("anyres", options=AnyResOptions, capabilities=("llava_next",),
                  example=lambda workdir: {"name": "anyres"})
def build_anyres(arg: str | None, options: AnyResOptions) -> AnyResLayout:
    if not options.grids or any(len(g) != 2 or min(g) < 1 for g in options.grids):
        raise MMError(f"layout anyres: grids must be a non-empty list of [cols, rows] with both >= 1, "
                      f"got {options.grids}")
    check_budget(options.max_image_tokens, "anyres")
    return AnyResLayout(options)
