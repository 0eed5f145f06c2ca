"""What every image layout provides: how one image becomes the tiles the encoder sees, and their token order.

Contract: ``layout(image, tile_size, budget_tiles=None) -> TiledImage``. The tiles are PIL images the encoder's
transform turns into ``[3, tile_size, tile_size]`` (the ``fixed`` layout hands the image over untouched); each
tile becomes ``tokens_per_tile`` image tokens, exactly as a whole image does without tiling. ``budget_tiles``
caps the images to encode (grid tiles plus any thumbnail); a layout never returns fewer than one.

In the text stream an image is its tiles' tokens in order: a grid row's tiles side by side, a newline token after
each row, and the thumbnail separated from the grid by a newline (after the grid for InternVL, before it for
LLaVA-NeXT's base image). A single tile without a thumbnail has no separator, so one-tile layouts are exactly
the untiled token stream.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from mm.errors import MMError
from mm.registry import Registry

LAYOUTS: Registry = Registry("layout")


@dataclass
class TiledImage:
    """One image laid out: ``tiles`` the grid in raster order (row by row), ``grid`` ``(cols, rows)``,
    ``thumbnail`` the whole image at tile size (or None), placed before the grid when ``thumbnail_first``."""

    tiles: list[Image.Image]
    grid: tuple[int, int] = (1, 1)
    thumbnail: Image.Image | None = None
    thumbnail_first: bool = False

    def __post_init__(self) -> None:
        cols, rows = self.grid
        if cols * rows != len(self.tiles) or not self.tiles:
            raise MMError(f"a {cols}x{rows} grid needs {cols * rows} tiles, got {len(self.tiles)}")

    @property
    def num_images(self) -> int:
        """Images the encoder runs on for this one: the tiles plus the thumbnail."""
        return len(self.tiles) + (self.thumbnail is not None)

    def images(self) -> list[Image.Image]:
        """Every image to encode, in the order their tokens appear."""
        if self.thumbnail is None:
            return list(self.tiles)
        return [self.thumbnail, *self.tiles] if self.thumbnail_first else [*self.tiles, self.thumbnail]

    def token_ids(self, tokens_per_tile: int, image_id: int, newline_id: int) -> list[int]:
        """The ids this image takes in the text stream: image ids per tile, newline separators."""
        if self.num_images == 1:
            return [image_id] * tokens_per_tile
        cols, rows = self.grid
        grid = ([image_id] * tokens_per_tile * cols + [newline_id]) * rows
        if self.thumbnail is None:
            return grid
        thumbnail = [image_id] * tokens_per_tile
        return thumbnail + [newline_id] + grid if self.thumbnail_first else grid + thumbnail

    def num_tokens(self, tokens_per_tile: int) -> int:
        """Tokens of this image: tiles x tokens per tile, plus the thumbnail's, plus the separators."""
        return len(self.token_ids(tokens_per_tile, 0, 1))

    def feature_order(self, tokens_per_tile: int) -> list[int] | None:
        """Per image token of this image, in stream order, the index of its feature among this image's
        ``num_images * tokens_per_tile`` features (the images of ``images()`` one after another); None: all of
        them, in that order (every layout here but LLaVA-NeXT's, which rearranges and drops features)."""
        return None


class Layout:
    """A registered layout. ``static``: every image is one tile whatever its size, so the token count is known
    without the image (the ``fixed`` layout). ``max_image_tokens``: the per-document budget, or None.
    ``rearranges_features``: its images' tokens take their features in another order than encoded, or not all
    of them (``TiledImage.feature_order``); a batch then needs ``image_index`` (``ImageTiler.feature_index``)."""

    static: bool = False
    max_image_tokens: int | None = None
    rearranges_features: bool = False

    def __call__(self, image: Image.Image, tile_size: int, budget_tiles: int | None = None) -> TiledImage:
        raise NotImplementedError


def lay_out(layout: Layout, images: list[Image.Image], tile_size: int, tokens_per_tile: int,
            max_image_tokens: int | None = None) -> list[TiledImage]:
    """The layouts of one document's images, their tokens (separators included) within ``max_image_tokens``.

    Each image is first laid out in full; while the document is over budget, the image costing the most tokens
    (the first of equals) is laid out again with one tile fewer. An image never gets less than one tile, so a
    budget below ``len(images) * tokens_per_tile`` is an error."""
    tiled = [layout(image, tile_size) for image in images]
    if max_image_tokens is None:
        return tiled
    if len(images) * tokens_per_tile > max_image_tokens:
        raise MMError(f"max_image_tokens {max_image_tokens} cannot hold {len(images)} images of at least "
                      f"{tokens_per_tile} tokens each")
    costs = [t.num_tokens(tokens_per_tile) for t in tiled]
    while sum(costs) > max_image_tokens:
        shrinkable = [i for i, t in enumerate(tiled) if t.num_images > 1]
        if not shrinkable:  # a layout that ignored budget_tiles=1 would otherwise never finish
            raise MMError(f"layout {type(layout).__name__} cannot fit {len(images)} images in {max_image_tokens} "
                          f"tokens")
        i = max(shrinkable, key=lambda k: costs[k])
        tiled[i] = layout(images[i], tile_size, tiled[i].num_images - 1)
        costs[i] = tiled[i].num_tokens(tokens_per_tile)
    return tiled


def check_budget(max_image_tokens: int | None, name: str) -> None:
    if max_image_tokens is not None and max_image_tokens < 1:
        raise MMError(f"layout {name}: max_image_tokens must be positive or null, got {max_image_tokens}")


@dataclass
class ImageTiler:
    """What turns a document's images into encoder tiles and their token spans: the model's layout, tile size and
    token ids. Picklable, so data-loader workers get a copy (``MultimodalModel.image_tiler``)."""

    layout: Layout
    tile_size: int  # the encoder's input side
    tokens_per_tile: int  # the adapter's tokens per image
    image_token_id: int
    newline_id: int

    def lay_out(self, images: list[Image.Image], max_image_tokens: int | None = None) -> list[TiledImage]:
        """One document's images (or row's, with a per-row ``max_image_tokens``); the layout's own budget
        applies when none is given. Images already laid out are returned as they are."""
        if all(isinstance(image, TiledImage) for image in images):
            return list(images)
        budget = self.layout.max_image_tokens if max_image_tokens is None else max_image_tokens
        return lay_out(self.layout, images, self.tile_size, self.tokens_per_tile, budget)

    def spans(self, tiled: list[TiledImage]) -> list[list[int]]:
        """Per image, the ids its ``<image>`` marker expands to (tile tokens and separators)."""
        return [t.token_ids(self.tokens_per_tile, self.image_token_id, self.newline_id) for t in tiled]

    def feature_index(self, tiled: list[TiledImage]) -> list[int] | None:
        """Per image token of these images (a batch's, in order), the row of the encoded features
        ``[tiles * tokens_per_tile, D]`` it takes; None when every image takes all its features in order."""
        orders = [t.feature_order(self.tokens_per_tile) for t in tiled]
        if all(order is None for order in orders):
            return None
        index, offset = [], 0
        for t, order in zip(tiled, orders):
            count = t.num_images * self.tokens_per_tile
            index += [offset + i for i in (range(count) if order is None else order)]
            offset += count
        return index

    @staticmethod
    def tiles(tiled: list[TiledImage]) -> list[Image.Image]:
        """Every tile to encode, image after image, in token order (the transform makes ``pixel_values``)."""
        return [tile for t in tiled for tile in t.images()]
