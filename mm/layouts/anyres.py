"""``anyres``: LLaVA-NeXT's AnyRes.

Candidate grids ``(cols, rows)`` (LLaVA-NeXT's ``image_grid_pinpoints`` divided by the tile size; default its
336 x {672, ...} list). For each, with the grid's pixel size ``w x h`` and the image's ``W x H``:
``scale = min(w / W, h / H)``, effective = ``min(int(W * scale) * int(H * scale), W * H)``, waste = ``w * h -
effective``; the largest effective resolution wins, ties to the least waste, then to the earlier grid. The image
is resized keeping its aspect ratio, centred on black to the grid's size and cut into tiles; the base image (the
whole image resized to one tile) comes first. A tile budget drops the grids that do not fit (the base image
counts); when none fits, the base image alone is the one tile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image

from mm.errors import MMError
from mm.layouts.base import LAYOUTS, Layout, TiledImage, check_budget
from mm.layouts.dynamic import cut

LLAVA_NEXT_GRIDS = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]  # llava-v1.6: [[336, 672], [672, 336], ...] / 336


@dataclass
class AnyResOptions:
    grids: list[list[int]] = field(default_factory=lambda: [list(g) for g in LLAVA_NEXT_GRIDS])  # [cols, rows]
    max_image_tokens: int | None = None  # per document: tiles, base images and separators of all its images


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


class AnyResLayout(Layout):
    def __init__(self, options: AnyResOptions):
        self.grids = [tuple(grid) for grid in options.grids]
        self.max_image_tokens = options.max_image_tokens

    def __call__(self, image: Image.Image, tile_size: int, budget_tiles: int | None = None) -> TiledImage:
        base = image.resize((tile_size, tile_size))
        grids = [g for g in self.grids if budget_tiles is None or g[0] * g[1] + 1 <= budget_tiles]
        if not grids:
            return TiledImage([base])
        w, h = best_resolution(*image.size, [(cols * tile_size, rows * tile_size) for cols, rows in grids])
        grid = (w // tile_size, h // tile_size)
        return TiledImage(cut(resize_and_pad(image, w, h), grid, tile_size), grid, base, thumbnail_first=True)


@LAYOUTS.register("anyres", options=AnyResOptions, example=lambda workdir: {"name": "anyres"})
def build_anyres(arg: str | None, options: AnyResOptions) -> AnyResLayout:
    if not options.grids or any(len(g) != 2 or min(g) < 1 for g in options.grids):
        raise MMError(f"layout anyres: grids must be a non-empty list of [cols, rows] with both >= 1, "
                      f"got {options.grids}")
    check_budget(options.max_image_tokens, "anyres")
    return AnyResLayout(options)
