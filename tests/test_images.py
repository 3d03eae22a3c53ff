"""images.process: whatever comes in, an upright RGB JPEG of the requested size comes out, or a reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from helpers import png_header_only
from PIL import Image

from skinlesion.data import images
from skinlesion.data.images import BadImage


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _ramp(size: tuple[int, int] = (120, 80)) -> np.ndarray:
    return np.tile(np.linspace(0, 1, size[0]), (size[1], 1))


def _gradient(size: tuple[int, int] = (120, 80)) -> Image.Image:
    """Black on the left to white on the right."""
    return Image.fromarray((_ramp(size) * 255).astype(np.uint8)).convert("RGB")


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("RGB", "JPEG"),
        ("L", "PNG"),
        ("I;16", "PNG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("RGB", "PNG"),
    ],
)
def test_any_mode_becomes_rgb_jpeg_with_shorter_side(mode: str, fmt: str) -> None:
    im = _gradient().convert(mode) if mode != "I;16" else Image.fromarray((_ramp() * 60000).astype(np.uint16))
    out = _decode(images.process_bytes(_save(im, fmt), 40))
    assert out.format == "JPEG" and out.mode == "RGB"
    assert out.size == (60, 40)  # 120x80 -> shorter side 40, aspect kept
    # The left-to-right ramp survives (16-bit grey is rescaled, not clipped to white).
    assert out.getpixel((2, 20))[0] < 40 and out.getpixel((57, 20))[0] > 200


def test_png_named_jpg_is_converted(tmp_path: Path) -> None:
    path = tmp_path / "ISIC_0000001.jpg"
    path.write_bytes(_save(_gradient().convert("RGBA"), "PNG"))
    out = _decode(images.process(path, 0))  # even with 0 (keep size): not a JPEG, so re-encoded
    assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (120, 80))


def test_transparent_pixels_become_white() -> None:
    im = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    out = _decode(images.process_bytes(_save(im, "PNG"), 16))
    assert min(out.getpixel((8, 8))) > 245


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (60, 30), "white")
    im.paste((255, 0, 0), (0, 0, 30, 30))  # red on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to display
    out = _decode(images.process_bytes(_save(im, "JPEG", exif=exif), 30))
    assert out.size == (30, 60)
    r, g, _ = out.getpixel((15, 5))  # after rotating clockwise, the left half is on top
    assert r > 200 and g < 60


def test_size_zero_keeps_rgb_jpeg_bytes() -> None:
    data = _save(_gradient(), "JPEG", quality=75)
    assert images.process_bytes(data, 0) == data


def test_upscales_small_images() -> None:
    out = _decode(images.process_bytes(_save(_gradient((30, 20)), "JPEG"), 40))
    assert out.size == (60, 40)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", images.EMPTY),
        (b"this is not an image at all", images.CORRUPT),
        (_save(_gradient(), "JPEG")[:600], images.TRUNCATED),
        (_save(_gradient(), "PNG")[:60], images.TRUNCATED),
    ],
    ids=["empty", "garbage", "truncated-jpeg", "truncated-png"],
)
def test_bad_bytes_are_rejected_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(BadImage) as info:
        images.process_bytes(data, 32)
    assert info.value.reason == reason


def test_corrupt_jpeg_is_rejected() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    data = bytearray(_save(Image.fromarray(noise), "JPEG"))
    data[200:500] = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()  # smash the tables
    with pytest.raises(BadImage) as info:
        images.process_bytes(bytes(data), 32)
    assert info.value.reason == images.CORRUPT


@pytest.mark.parametrize("pixels", [100_000 * 1_000, 12_000 * 10_000])  # above 2x and between 1x and 2x the limit
def test_decompression_bomb_is_rejected(pixels: int) -> None:
    width = 10_000
    with pytest.raises(BadImage) as info:
        images.process_bytes(png_header_only(width, pixels // width), 256)
    assert info.value.reason == images.BOMB


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(BadImage) as info:
        images.process(tmp_path / "nope.jpg", 32)
    assert info.value.reason == images.UNREADABLE
