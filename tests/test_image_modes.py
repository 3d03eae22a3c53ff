"""Every image mode PIL can open means one thing in 8-bit RGB (issue 16, point 5).

Each case builds the same picture in another mode (and file format, where one stores the mode), decodes
it as predict and serve do (`decode_rgb`) and compares it with the 8-bit RGB original. Before, 16-bit grey
was stretched from each image's own min..max to 0..255, so an 8-bit and a 16-bit PNG of one picture gave
different pixels (and different predictions).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageCms

from skinlesion.data import images
from skinlesion.data.images import BadImage

W, H = 48, 36
HOLE = (slice(4, 12), slice(6, 18))  # rows, columns made transparent
HALF = (slice(20, 30), slice(30, 44))  # rows, columns at alpha 128


def _picture() -> np.ndarray:
    """RGB with at most 216 colours (6 levels per channel), so a palette holds it exactly; no channel spans
    the full range, so a per-image stretch would show."""
    y, x = np.mgrid[0:H, 0:W]
    levels = np.array([30, 70, 110, 150, 190, 220], dtype=np.uint8)
    return np.stack([levels[x * 6 // W], levels[y * 6 // H], levels[(x // 8 + y // 6) % 6]], axis=-1)


def _grey() -> np.ndarray:
    return np.asarray(Image.fromarray(_picture()).convert("L"))


def _save(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _decoded(data: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == mode, f"the file opens as {check.mode}, not {mode}: the case tests something else"
    out = images.decode_rgb(data)
    assert out.mode == "RGB" and out.size == (W, H)
    return np.asarray(out).astype(int)


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1).astype(int)


def _composited(rgb: np.ndarray) -> np.ndarray:
    """What the alpha cases must give: white in HOLE, half way to white in HALF."""
    out = rgb.astype(float)
    out[HOLE] = 255
    out[HALF] = out[HALF] * 128 / 255 + 255 * 127 / 255
    return out


def _alpha() -> np.ndarray:
    alpha = np.full((H, W), 255, np.uint8)
    alpha[HOLE], alpha[HALF] = 0, 128
    return alpha


def _with_garbage_in_hole(values: np.ndarray) -> np.ndarray:
    """A transparent pixel's colour is arbitrary: make it something that would show."""
    out = values.copy()
    out[HOLE] = 0
    return out


def _srgb_to_lab(im: Image.Image) -> Image.Image:
    """CIELAB as TIFF defines it (D50), through littlecms."""
    srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    return ImageCms.applyTransform(im, ImageCms.buildTransform(srgb, lab, "RGB", "LAB"))


# name -> (file bytes, the mode PIL opens them as, the expected RGB, the largest difference allowed)
Case = Callable[[], tuple[bytes, str, np.ndarray, float]]


def _sixteen(fmt: str, mode: str, dtype: str) -> Case:
    return lambda: (_save(Image.fromarray(_wide(dtype)), fmt), mode, _rgb(_grey()), 0)


def _wide(dtype: str) -> np.ndarray:
    """The grey picture on the full scale of a 16-bit (or 32-bit integer) type: value * 257."""
    return (_grey().astype(np.int64) * 257).astype(dtype)


CASES: dict[str, Case] = {
    "RGB png": lambda: (_save(Image.fromarray(_picture()), "PNG"), "RGB", _picture(), 0),
    "L png": lambda: (_save(Image.fromarray(_grey()), "PNG"), "L", _rgb(_grey()), 0),
    "P png": lambda: (
        _save(Image.fromarray(_picture()).convert("P", palette=Image.ADAPTIVE), "PNG"),
        "P",
        _picture(),
        0,
    ),
    "I;16 png": _sixteen("PNG", "I;16", "<u2"),
    "I;16 tiff": _sixteen("TIFF", "I;16", "<u2"),
    "I;16B tiff": _sixteen("TIFF", "I;16B", ">u2"),
    "I tiff": lambda: (_save(Image.fromarray(_wide("<i4")), "TIFF"), "I", _rgb(_grey()), 0),
    "F tiff": lambda: (
        _save(Image.fromarray((_grey() / 255).astype(np.float32)), "TIFF"),
        "F",
        _rgb(_grey()),
        0,
    ),
    "CMYK tiff": lambda: (_save(Image.fromarray(_picture()).convert("CMYK"), "TIFF"), "CMYK", _picture(), 0),
    "CMYK jpeg": lambda: (_save(Image.fromarray(_picture()).convert("CMYK"), "JPEG"), "CMYK", _picture(), 40),
    "YCbCr tiff": lambda: (_save(Image.fromarray(_picture()).convert("YCbCr"), "TIFF"), "YCbCr", _picture(), 3),
    "LAB tiff": lambda: (_save(_srgb_to_lab(Image.fromarray(_picture())), "TIFF"), "LAB", _picture(), 12),
    "RGBA png": lambda: (
        _save(Image.fromarray(np.dstack([_with_garbage_in_hole(_picture()), _alpha()])), "PNG"),
        "RGBA",
        _composited(_picture()),
        1,
    ),
    "LA png": lambda: (
        _save(Image.fromarray(np.dstack([_with_garbage_in_hole(_grey()), _alpha()])), "PNG"),
        "LA",
        _composited(_rgb(_grey())),
        1,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_mode_gives_the_8bit_rgb_original(name: str) -> None:
    data, mode, expected, tolerance = CASES[name]()
    difference = np.abs(_decoded(data, mode) - np.asarray(expected))
    # JPEG (lossy, chroma-subsampled) differs at colour edges, and 8-bit CIELAB's steps are coarse in a
    # saturated colour's dark channel (sRGB's curve is steep there); the mean error must still be small.
    assert difference.max() <= tolerance and difference.mean() <= 2.5, (name, difference.max(), difference.mean())


def test_a_16bit_png_gives_the_same_jpeg_as_the_8bit_png_of_the_same_picture() -> None:
    # The case: before, the 16-bit one was stretched to 0..255 (its grey spans 30..220 only).
    eight = images.process_bytes(_save(Image.fromarray(_grey()), "PNG"), 24)
    sixteen = images.process_bytes(_save(Image.fromarray(_wide("<u2")), "PNG"), 24)
    assert eight == sixteen


def test_palette_transparency_is_composited_on_white() -> None:
    palette_image = Image.fromarray(_picture()).convert("P", palette=Image.ADAPTIVE)
    indices = np.asarray(palette_image).copy()
    hidden = 255  # an index the 216 colours leave free, coloured black: a transparent pixel must not show it
    assert indices.max() < hidden
    palette = palette_image.getpalette()
    palette += [0] * (768 - len(palette))  # the hidden entry is black
    indices[HOLE] = hidden
    out = Image.fromarray(indices, "P")
    out.putpalette(palette)
    expected = _picture().astype(int)
    expected[HOLE] = 255
    buf = io.BytesIO()
    out.save(buf, format="PNG", transparency=hidden)
    assert np.array_equal(_decoded(buf.getvalue(), "P"), expected)


def test_16bit_grey_with_a_transparent_value_is_composited_on_white() -> None:
    values = _wide("<u2")
    values[HOLE] = 1  # no grey level of the picture maps to 1
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG", transparency=1)
    expected = _rgb(_grey())
    expected[HOLE] = 255
    assert np.array_equal(_decoded(buf.getvalue(), "I;16"), expected)


def test_bilevel_black_and_white_stay_black_and_white() -> None:
    picture = _grey() > 128
    expected = _rgb(np.where(picture, 255, 0))
    assert np.array_equal(_decoded(_save(Image.fromarray(picture), "PNG"), "1"), expected)


def test_pure_black_ink_in_cmyk_is_black() -> None:
    assert images.decode_rgb(_save(Image.new("CMYK", (8, 8), (0, 0, 0, 255)), "TIFF")).getpixel((4, 4)) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["HSV", "RGBX", "RGBa", "I;16N", "I;16L", "La", "PA"])
def test_modes_only_made_in_memory(mode: str) -> None:
    # No file format stores these (or PIL opens them as another mode); a caller may still pass one in.
    picture = Image.fromarray(_picture())
    if mode in ("I;16N", "I;16L"):
        im, expected = (
            Image.frombytes(mode, (W, H), _wide("=u2" if mode == "I;16N" else "<u2").tobytes()),
            _rgb(_grey()),
        )
    elif mode == "La":
        im, expected = Image.fromarray(np.dstack([_grey(), np.full((H, W), 255, np.uint8)])), _rgb(_grey())
        im = im.convert("La")
    elif mode == "PA":
        im, expected = picture.convert("P", palette=Image.ADAPTIVE).convert("PA"), _picture()
    else:
        im, expected = picture.convert(mode), _picture()
    out = np.asarray(images._to_rgb(im)).astype(int)
    assert np.abs(out - expected).max() <= (4 if mode == "HSV" else 1)  # 8-bit hue steps are 1.4 degrees


def _tiff_12bit(values: np.ndarray) -> bytes:
    """An uncompressed little-endian TIFF with 12-bit grey samples, packed as TIFF packs them (MSB first)."""
    h, w = values.shape
    assert w % 2 == 0
    flat = values.astype(np.uint32).reshape(-1, 2)
    packed = np.stack([flat[:, 0] >> 4, ((flat[:, 0] & 15) << 4) | (flat[:, 1] >> 8), flat[:, 1] & 255], axis=1)
    pixels = packed.astype(np.uint8).tobytes()
    tags = [
        (256, 3, w),
        (257, 3, h),
        (258, 3, 12),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8),
        (277, 3, 1),
        (278, 3, h),
        (279, 4, len(pixels)),
    ]
    ifd_at = 8 + len(pixels)
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", v, 0) if kind == 3 else struct.pack("<I", v))
        for tag, kind, v in tags
    )
    return b"II*\0" + struct.pack("<I", ifd_at) + pixels + ifd + b"\0\0\0\0"


def test_12bit_tiff_is_scaled_from_its_own_bit_depth() -> None:
    data = _tiff_12bit(np.rint(_grey().astype(float) * 4095 / 255).astype(np.uint16))
    assert np.array_equal(_decoded(data, "I;16"), _rgb(_grey()))


@pytest.mark.parametrize(
    ("values", "mode", "fmt", "says"),
    [
        (np.full((8, 8), 2.5, np.float32), "F", "TIFF", "float grey from 2.5 to 2.5; only 0..1"),
        (np.full((8, 8), np.nan, np.float32), "F", "TIFF", "float grey"),
        (np.full((8, 8), -3, np.int32), "I", "TIFF", "I grey from -3 to -3; only 0..65535"),
        (np.full((8, 8), 70000, np.int32), "I", "TIFF", "only 0..65535"),
    ],
)
def test_values_outside_the_modes_range_are_refused_not_clipped(values, mode: str, fmt: str, says: str) -> None:
    data = _save(Image.fromarray(values), fmt)
    for decode in (images.decode_rgb, lambda d: images.process_bytes(d, 8)):
        with pytest.raises(BadImage, match=says) as caught:
            decode(data)
        assert caught.value.reason == images.UNSUPPORTED
