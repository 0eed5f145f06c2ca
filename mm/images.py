"""Opening user images safely: one clear MMError for every way a file can be bad, RGB out."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from mm.errors import MMError

# Refuse anything over 64 megapixels (PIL warns past this and raises past twice this; we raise on both).
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on white; 16-bit and float images are rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        image = Image.fromarray(np.rint((array - low) * scale).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode an image from a path or bytes, fully, into RGB; raise MMError naming the file on any failure."""
    label = name or (str(source) if not isinstance(source, bytes) else "image")
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.is_file():
            raise MMError(f"image not found: {label}")
        source = path.read_bytes()
    if not source:
        raise MMError(f"image {label} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MMError(f"image {label} is too large (over {MAX_PIXELS // 1_000_000} megapixels)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "not a recognised image format" if "cannot identify image file" in str(exc) else str(exc)
        raise MMError(f"cannot read image {label}: {reason}") from None
    return to_rgb(image)
