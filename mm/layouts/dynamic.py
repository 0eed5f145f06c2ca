"""``dynamic``: InternVL's dynamic tiling (InternVL-1.5+, Mono-InternVL).

Candidate grids are every ``(cols, rows)`` with ``min_tiles <= cols * rows <= max_tiles``, ordered by tile count.
The grid whose ``cols / rows`` is closest to the image's ``width / height`` wins; on an exact tie a later (larger)
grid wins only if the image's area exceeds half of that grid's pixel area. The image is resized to
``(tile * cols, tile * rows)`` and cut row by row into tiles; with more than one tile and ``thumbnail``, the whole
image resized to one tile follows. A tile budget lowers ``max_tiles`` (the thumbnail counts).
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from mm.errors import MMError
from mm.layouts.base import LAYOUTS, Layout, TiledImage, check_budget


@dataclass
class DynamicOptions:
    max_tiles: int = 12  # InternVL's max_num
    min_tiles: int = 1  # InternVL's min_num
    thumbnail: bool = True  # append the whole image as one more tile when there are several
    max_image_tokens: int | None = None  # per document: tiles, thumbnails and separators of all its images


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """InternVL's ``target_ratios``: built and sorted exactly as its ``dynamic_preprocess`` does (a set sorted
    stably by tile count), so grids of equal tile count keep the same order as there."""
    grids = {(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_tiles <= i * j <= max_tiles}
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def closest_grid(width: int, height: int, grids: list[tuple[int, int]], tile_size: int) -> tuple[int, int]:
    """InternVL's ``find_closest_aspect_ratio``: ``(cols, rows)`` for a ``width x height`` image."""
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def cut(image: Image.Image, grid: tuple[int, int], tile_size: int) -> list[Image.Image]:
    """Resize to the grid's pixel size and cut it row by row into ``tile_size`` squares."""
    cols, rows = grid
    resized = image.resize((tile_size * cols, tile_size * rows))
    return [resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
            for r in range(rows) for c in range(cols)]


class DynamicLayout(Layout):
    def __init__(self, options: DynamicOptions):
        self.options = options
        self.max_image_tokens = options.max_image_tokens

    def __call__(self, image: Image.Image, tile_size: int, budget_tiles: int | None = None) -> TiledImage:
        o = self.options
        most = o.max_tiles
        if budget_tiles is not None:
            most = min(most, budget_tiles - 1 if o.thumbnail else budget_tiles)
        grid = closest_grid(*image.size, candidate_grids(o.min_tiles, most), tile_size) if most >= o.min_tiles \
            else (1, 1)
        tiles = cut(image, grid, tile_size)
        thumbnail = image.resize((tile_size, tile_size)) if o.thumbnail and len(tiles) > 1 else None
        return TiledImage(tiles, grid, thumbnail)


def _example(workdir) -> dict:
    return {"name": "dynamic", "max_tiles": 4}


@LAYOUTS.register("dynamic", options=DynamicOptions, example=_example)
def build_dynamic(arg: str | None, options: DynamicOptions) -> DynamicLayout:
    if not 1 <= options.min_tiles <= options.max_tiles:
        raise MMError(f"layout dynamic: need 1 <= min_tiles <= max_tiles, got min_tiles {options.min_tiles}, "
                      f"max_tiles {options.max_tiles}")
    check_budget(options.max_image_tokens, "dynamic")
    return DynamicLayout(options)
