"""``fixed``: one image, one tile, untouched: the encoder's transform resizes it as it always did (the default)."""
from __future__ import annotations

from PIL import Image

from mm.layouts.base import LAYOUTS, Layout, TiledImage


class FixedLayout(Layout):
    static = True

    def __call__(self, image: Image.Image, tile_size: int, budget_tiles: int | None = None) -> TiledImage:
        return TiledImage([image])


@LAYOUTS.register("fixed", capabilities=("llava",), example=lambda workdir: {"name": "fixed"})
def build_fixed(arg: str | None, options) -> FixedLayout:
    return FixedLayout()
