"""Decode, validate, orient, convert, resize and re-encode one image.

Every image that reaches a shard passes through `process`: whatever came in (grayscale, CMYK,
RGBA, palette, a PNG named .jpg, a phone photo with an EXIF rotation), what goes out is an RGB
JPEG the right way up whose shorter side is `size`. A file that cannot be trusted raises
`BadImage` with a short reason that ends up in rejected.csv.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

JPEG_QUALITY = 90
# PIL's own default: above this many pixels a file is treated as a decompression bomb.
MAX_PIXELS = 89_478_485

# Reasons, as written to rejected.csv.
EMPTY = "empty file"
UNREADABLE = "unreadable file"
CORRUPT = "corrupt image"
TRUNCATED = "truncated image"
BOMB = "decompression bomb"


class BadImage(Exception):
    """An image that cannot be used; `reason` is one of the constants above."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def process(path: Path | str, size: int, max_pixels: int = MAX_PIXELS) -> bytes:
    """The image at path as RGB JPEG bytes with shorter side `size` (0: keep the original size).

    With size 0 a file that already is an upright RGB JPEG is returned byte for byte; anything
    else is converted at its original size, so shards only ever hold RGB JPEGs.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImage(UNREADABLE, exc.strerror or str(exc)) from exc
    if not data:
        raise BadImage(EMPTY)
    return process_bytes(data, size, max_pixels)


def process_bytes(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> bytes:
    """`process` for bytes already in memory."""
    with _guard(data, max_pixels):
        return _convert(data, size)


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Upright RGB image from file bytes, under the same checks as `process` (what predict and serve use,
    so an image prepare would reject as a bomb or a truncated file is rejected there too)."""
    with _guard(data, max_pixels), Image.open(io.BytesIO(data)) as im:
        im.load()
        orientation = im.getexif().get(0x0112, 1)
        return _to_rgb(ImageOps.exif_transpose(im) if orientation != 1 else im)


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


def _convert(data: bytes, size: int) -> bytes:
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
        # exif_transpose copies the image even when there is nothing to do: only call it when needed.
        out = _to_rgb(ImageOps.exif_transpose(im) if orientation != 1 else im)
    if size > 0:
        out = resize_shorter(out, size)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with transparency flattened onto white (a transparent pixel's hidden colour is arbitrary)."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # 16-bit and float grayscale: scale into 8 bits instead of clipping everything to white.
        im = im.convert("F")
        lo, hi = im.getextrema()
        im = im.point(lambda v: (v - lo) * 255.0 / max(hi - lo, 1)).convert("L")
    return im.convert("RGB")


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
