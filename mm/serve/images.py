"""Turning ``image_url`` parts into RGB images: ``data:`` URLs always, ``http(s)://`` only when allowed."""
from __future__ import annotations

import base64
import binascii

import httpx
from PIL import Image
from starlette.concurrency import run_in_threadpool

from mm.errors import MMError
from mm.images import open_image
from mm.serve.protocol import APIError, bad


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


async def fetch(url: str, label: str, max_bytes: int, timeout: float = 10.0) -> bytes:
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True, max_redirects=3) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise bad(f"image {label}: fetching {url} gave HTTP {response.status_code}", code="image_fetch_failed",
                              param="messages")
                chunks, size = [], 0
                async for piece in response.aiter_bytes():
                    size += len(piece)
                    if size > max_bytes:
                        raise _too_large(f"image {label}", max_bytes)
                    chunks.append(piece)
                return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise bad(f"image {label}: cannot fetch {url}: {exc}", code="image_fetch_failed", param="messages") from None


async def load_images(urls: list[str], allow_remote: bool, max_bytes: int) -> list[Image.Image]:
    """Decode every image fully (``mm.images.open_image``: truncated files, bombs and non-images are refused)."""
    images = []
    for i, url in enumerate(urls):
        label = f"#{i + 1}"
        if url.startswith("data:"):
            raw = decode_data_url(url, label, max_bytes)
        elif url.startswith(("http://", "https://")):
            if not allow_remote:
                raise bad(f"image {label}: remote image URLs are disabled on this server (start it with "
                          "--allow-remote-images); send the image inline as a data: URL", code="remote_images_disabled",
                          param="messages")
            raw = await fetch(url, label, max_bytes)
        else:
            raise bad(f"image {label}: unsupported image URL scheme (expected data: or http(s)://)", code="invalid_image_url",
                      param="messages")
        try:
            images.append(await run_in_threadpool(open_image, raw, label))
        except MMError as exc:
            raise bad(str(exc), code="invalid_image", param="messages") from None
    return images
