"""Image layouts: how an image becomes the tiles the encoder sees; importing this registers all of them."""
from mm.layouts import anyres, dynamic, fixed  # noqa: F401  (registration)
from mm.layouts.base import LAYOUTS, ImageTiler, Layout, TiledImage, lay_out

__all__ = ["LAYOUTS", "ImageTiler", "Layout", "TiledImage", "lay_out"]
