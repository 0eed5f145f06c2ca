"""Turning ``image_url`` parts into RGB images: ``data:`` URLs always, ``http(s)://`` only when allowed.

Memory per request is bounded: each encoded image by ``max_bytes``; the decoded pixels of all of a request's
images by ``max_pixels``, summed from the image headers (PIL reads the size without decoding) before any image is
decoded; and a decoded image is kept at most ``keep_side`` pixels on its long side while it waits for the model
(the encoder shrinks it to its own input size anyway). At most ``DECODE_SLOTS`` requests decode at once, and the
memory the decoder freed is handed back to the operating system. Only the common formats (``FORMATS``) are
decoded: PIL's other plugins are rarely used and less tested, and its EPS reader runs Ghostscript.
"""
from __future__ import annotations

import base64
import binascii
import ctypes
import io
import logging
import threading
import warnings

from PIL import Image
from starlette.concurrency import run_in_threadpool

from mm.errors import MMError
from mm.images import MAX_PIXELS, open_image
from mm.serve.protocol import APIError, bad
from mm.serve.remote import FetchFailed, RemotePolicy, TooLarge

log = logging.getLogger("mm.serve")

FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")  # PIL format names (MPO: multi-picture JPEG)
DECODE_SLOTS = threading.BoundedSemaphore(4)  # requests decoding at once, each within its own pixel budget
TRIM_PIXELS = 4_000_000  # after decoding this many pixels, return the freed memory to the OS
try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc
except (AttributeError, OSError, TypeError):
    _malloc_trim = None


def release_freed_memory() -> None:
    """Return freed heap memory to the OS. glibc keeps a freed decode buffer in the decoding thread's arena:
    four 64-megapixel images left the server 800 MB larger after the request had ended."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _too_large(label: str, max_bytes: int) -> APIError:
    return bad(f"{label} is larger than the server's limit of {max_bytes} bytes", code="image_too_large",
               param="messages")


def decode_data_url(url: str, label: str, max_bytes: int) -> bytes:
    header, sep, data = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise bad(f"image {label}: a data URL must look like data:image/<type>;base64,<data>", code="invalid_image_url",
                  param="messages")
    if len(data) * 3 // 4 > max_bytes + 3:
        raise _too_large(f"image {label}", max_bytes)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"image {label}: the data URL is not valid base64", code="invalid_image_url", param="messages") from None
    if len(raw) > max_bytes:
        raise _too_large(f"image {label}", max_bytes)
    return raw


async def _read(url: str, label: str, max_bytes: int, remote: RemotePolicy | None) -> bytes:
    if url.startswith("data:"):
        return decode_data_url(url, label, max_bytes)
    if not url.startswith(("http://", "https://")):
        raise bad(f"image {label}: unsupported image URL scheme (expected data: or http(s)://)",
                  code="invalid_image_url", param="messages")
    if remote is None:
        raise bad(f"image {label}: remote image URLs are disabled on this server (start it with "
                  "--allow-remote-images); send the image inline as a data: URL", code="remote_images_disabled",
                  param="messages")
    try:
        return await remote.fetch(url, max_bytes)
    except TooLarge as exc:
        log.info("remote image %s refused: %s", label, exc)
        raise _too_large(f"image {label}", max_bytes) from None
    except FetchFailed as exc:  # the reason may name internal hosts: the log gets it, the client does not
        log.info("remote image %s refused: %s", label, exc)
        raise bad(f"image {label}: the image URL could not be fetched (remote images must be public http(s) URLs "
                  f"that answer within {remote.deadline:g} s)", code="image_fetch_failed", param="messages") from None


def header_pixels(raw: bytes, label: str) -> int:
    """Width x height from the header alone (MMError for a format outside FORMATS, a bomb, a non-image)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:
                kind, (width, height) = image.format, image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MMError(f"image {label} is too large (over {MAX_PIXELS // 1_000_000} megapixels)") from None
    except Exception:  # noqa: BLE001 - not an image: open_image fails the same way and says why in its words
        open_image(raw, label)
        raise MMError(f"cannot read image {label}") from None
    if kind not in FORMATS:
        raise MMError(f"image {label} is {kind}; this server reads {', '.join(FORMATS)}")
    return width * height


def decode(raws: list[bytes], max_pixels: int, keep_side: int) -> list[Image.Image]:
    """Check the pixel budget from the headers, then decode each image and shrink it to ``keep_side``."""
    labels = [f"#{i + 1}" for i in range(len(raws))]
    pixels = sum(header_pixels(raw, label) for raw, label in zip(raws, labels))
    if pixels > max_pixels:
        raise APIError(413, f"the request's images hold {pixels / 1e6:.1f} megapixels; this server decodes at most "
                       f"{max_pixels / 1e6:g} per request", code="too_many_pixels", param="messages")
    with DECODE_SLOTS:
        try:
            images = []
            for raw, label in zip(raws, labels):
                image = open_image(raw, label)
                if max(image.size) > keep_side:
                    image.thumbnail((keep_side, keep_side), Image.Resampling.BICUBIC)
                images.append(image)
            return images
        finally:
            if pixels >= TRIM_PIXELS:  # a trim costs ~10 ms; worth it only after large decodes
                release_freed_memory()


async def load_images(urls: list[str], max_bytes: int, max_pixels: int, keep_side: int,
                      remote: RemotePolicy | None) -> list[Image.Image]:
    """Read every image (``remote`` None: http(s) refused), then decode them all within the pixel budget
    (``mm.images.open_image``: truncated files, bombs and non-images are refused)."""
    if not urls:
        return []
    raws = [await _read(url, f"#{i + 1}", max_bytes, remote) for i, url in enumerate(urls)]
    try:
        return await run_in_threadpool(decode, raws, max_pixels, keep_side)
    except MMError as exc:
        raise bad(str(exc), code="invalid_image", param="messages") from None
