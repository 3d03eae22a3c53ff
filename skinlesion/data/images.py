"""Decode, validate, orient, convert, resize and re-encode one image.

Every image that reaches a shard passes through `process`: whatever came in (grayscale, CMYK,
RGBA, palette, a PNG named .jpg, a phone photo with an EXIF rotation), what goes out is an RGB
JPEG the right way up whose shorter side is `size`. A file that cannot be trusted raises
`BadImage` with a short reason that ends up in rejected.csv.

Each mode's values have one meaning (`_to_rgb`, table in docs/data.md), so a picture's pixels do not depend
on the bit depth or mode it was saved in: a per-image contrast stretch of 16-bit grey once made the same
lesion's 8-bit and 16-bit PNGs score 0.897 and 0.936 malignant.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

MAX_STORED_SIZE = 4096  # shorter side in shards; a typo like 100000 would upscale every image to gigabytes
JPEG_QUALITY = 90  # what prepare re-encodes shard images at; the manifest and the checkpoint's facts record it
# PIL's own default: above this many pixels a file is treated as a decompression bomb.
MAX_PIXELS = 89_478_485

# Reasons, as written to rejected.csv.
EMPTY = "empty file"
UNREADABLE = "unreadable file"
CORRUPT = "corrupt image"
TRUNCATED = "truncated image"
BOMB = "decompression bomb"
UNSUPPORTED = "unsupported pixel values"

# Grey modes wider than 8 bits; their values are scaled from the full range of the type (see `_to_rgb`).
WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
BACKGROUND = (255, 255, 255)  # what transparent pixels become


class BadImage(Exception):
    """An image that cannot be used; `reason` is one of the constants above."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def process(path: Path | str, size: int, max_pixels: int = MAX_PIXELS, quality: int = JPEG_QUALITY) -> bytes:
    """The image at path as RGB JPEG bytes (at JPEG `quality`) with shorter side `size` (0: keep the original size).

    With size 0 a file that already is an upright RGB JPEG is returned byte for byte; anything
    else is converted at its original size, so shards only ever hold RGB JPEGs.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImage(UNREADABLE, exc.strerror or str(exc)) from exc
    if not data:
        raise BadImage(EMPTY)
    return process_bytes(data, size, max_pixels, quality)


def process_bytes(data: bytes, size: int, max_pixels: int = MAX_PIXELS, quality: int = JPEG_QUALITY) -> bytes:
    """`process` for bytes already in memory. Predict and serve call it too, with the shard size and quality
    a checkpoint records, so that a file reaches the model through the very steps its shard image took
    (`inference.file_to_input`)."""
    with _guard(data, max_pixels):
        return _convert(data, size, quality)


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Upright RGB image from file bytes, under the same checks as `process` (what predict and serve use,
    so an image prepare would reject as a bomb or a truncated file is rejected there too)."""
    with _guard(data, max_pixels), Image.open(io.BytesIO(data)) as im:
        im.load()
        return _upright_rgb(im, im.getexif().get(0x0112, 1))


@contextlib.contextmanager
def _guard(data: bytes, max_pixels: int) -> Iterator[None]:
    """Decode under the pixel limit with bomb warnings as errors; PIL's many exceptions become `BadImage`."""
    if not data:
        raise BadImage(EMPTY)
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone else's global setting would let truncated files through
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; refusing to validate images with it")
    with warnings.catch_warnings():
        # PIL warns between max_pixels and twice that, and raises above: both are bombs here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage(BOMB, str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise BadImage(CORRUPT, "no image format recognised") from exc
        except OSError as exc:
            reason = TRUNCATED if "truncated" in str(exc).lower() else CORRUPT
            raise BadImage(reason, str(exc)) from exc
        except (SyntaxError, ValueError, TypeError, IndexError, EOFError) as exc:  # PIL's plugins raise all of these
            raise BadImage(CORRUPT, str(exc)) from exc
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _convert(data: bytes, size: int, quality: int) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        orientation = im.getexif().get(0x0112, 1)
        if size > 0 and im.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale straight from the DCT coefficients when that
            # still leaves the shorter side >= size: most of the decoding and resizing work disappears.
            w, h = im.size
            scale = size / min(w, h)
            im.draft(im.mode, (max(1, round(w * scale)), max(1, round(h * scale))))
        im.load()
        if size == 0 and im.format == "JPEG" and im.mode == "RGB" and orientation == 1:
            return data
        out = _upright_rgb(im, orientation)
    if size > 0:
        out = resize_shorter(out, size)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _upright_rgb(im: Image.Image, orientation: int) -> Image.Image:
    """8-bit RGB the right way up. The value scale is read first: transposing makes a plain copy without
    the TIFF tags that say how many of a 16-bit sample's bits are used."""
    top = _full_scale(im)
    # exif_transpose copies the image even when there is nothing to do: only call it when needed.
    return _to_rgb(ImageOps.exif_transpose(im) if orientation != 1 else im, top)


def _full_scale(im: Image.Image) -> int:
    """The sample value that means white in a wide grey image: 65535 for 16 bits, 4095 for a 12-bit TIFF."""
    tags = getattr(im, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None  # TIFF BitsPerSample
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    if isinstance(bits, int) and 8 < bits < 16 and im.mode in WIDE_GREY:
        return 2**bits - 1
    return 65535


def _to_rgb(im: Image.Image, top: int = 65535) -> Image.Image:
    """8-bit RGB by what the mode's values mean, never by the image's own min..max (see docs/data.md).

    Wide grey (16-bit, 32-bit integer) is scaled from 0..`top` and float from 0..1, so the same picture
    saved at another bit depth gives the same pixels; transparency is flattened onto `BACKGROUND` (a
    transparent pixel's hidden colour is arbitrary).
    """
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in WIDE_GREY or im.mode == "F":
        im = _wide_grey_to_8bit(im, top)
    if "transparency" in im.info and im.mode in ("1", "L", "P", "RGB"):  # PNG tRNS: one value or palette alphas
        im = im.convert("RGBA")
    if im.mode == "La":  # premultiplied grey + alpha: PIL converts it only to LA
        im = im.convert("LA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode == "LAB":  # CIELAB (TIFF): through littlecms, as older PIL cannot convert LAB itself
        return ImageCms.applyTransform(im, _lab_to_srgb())
    return im.convert("RGB")  # 1, L, P, CMYK (PIL's formula, no ICC profile), YCbCr, HSV, RGBX


def _wide_grey_to_8bit(im: Image.Image, top: int) -> Image.Image:
    """L (or LA, when a PNG tRNS value marks transparent pixels) from 16/32-bit integer or float grey."""
    values = np.asarray(im)
    if values.size == 0:
        raise BadImage(CORRUPT, "no pixels")
    lo, hi = values.min(), values.max()
    if im.mode == "F":
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
            raise BadImage(UNSUPPORTED, f"float grey from {lo:g} to {hi:g}; only 0..1 is understood")
        scaled = values.astype(np.float64) * 255.0
    else:
        if lo < 0 or hi > top:
            raise BadImage(UNSUPPORTED, f"{im.mode} grey from {lo} to {hi}; only 0..{top} is understood")
        scaled = values.astype(np.float64) * (255.0 / top)
    grey = Image.fromarray(np.rint(scaled).astype(np.uint8), "L")
    key = im.info.get("transparency")
    if isinstance(key, int) and not isinstance(key, bool):
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
        grey = Image.merge("LA", (grey, alpha))
    return grey


@functools.cache
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")


def resize_shorter(im: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is `size`, keeping the aspect ratio (antialiased)."""
    w, h = im.size
    if min(w, h) == size:
        return im
    scale = size / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    # PIL's bilinear filter widens with the scale factor, so downscaling is antialiased (as in torchvision's
    # Resize); it costs about half of Lanczos, and resizing costs more than decoding a 600x450 JPEG.
    # reducing_gap: for big factors (huge PNGs; JPEGs are already reduced by draft) a cheap box reduction first.
    return im.resize(new, Image.BILINEAR, reducing_gap=3.0)
