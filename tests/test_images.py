import io

import numpy as np
import pytest
from PIL import Image

from mm.errors import MMError
from mm.images import open_image


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "image, fmt",
    [
        (Image.new("L", (8, 8), 100), "PNG"),
        (Image.new("P", (8, 8), 3), "PNG"),
        (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG"),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"),
        (Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000), "PNG"),
        (Image.new("1", (8, 8), 1), "PNG"),
    ],
)
def test_every_mode_becomes_rgb(image, fmt):
    out = open_image(encode(image, fmt))
    assert out.mode == "RGB" and out.size == (8, 8)


def test_transparent_pixels_become_white():
    out = open_image(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped():
    array = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    out = np.asarray(open_image(encode(Image.fromarray(array), "PNG")))
    assert out.min() == 0 and out.max() == 255


def test_bad_files_raise_one_clear_error(tmp_path):
    with pytest.raises(MMError, match="image not found"):
        open_image(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(MMError, match="empty"):
        open_image(tmp_path / "empty.jpg")
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(MMError, match="cannot read image"):
        open_image(data[: len(data) // 2], name="half.jpg")
    with pytest.raises(MMError, match="cannot read image"):
        open_image(b"not an image at all")


def test_decompression_bomb_is_refused():
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")  # 100 MP, a few KB on disk
    with pytest.raises(MMError, match="too large"):
        open_image(bomb)
