"""Small builders shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pandas as pd

from skinlesion.data.prepare import PrepareOptions


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's signature)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def small_options(synthetic_dir: Path, tmp_path: Path, n: int = 120) -> PrepareOptions:
    """Options for a quick run on the first n rows of the session's synthetic dataset (images copied)."""
    rows = pd.read_csv(synthetic_dir / "HAM10000_metadata.csv", dtype=str).head(n)
    rows.to_csv(tmp_path / "meta.csv", index=False)
    images = tmp_path / "images"
    images.mkdir()
    for image_id in rows["image_id"]:
        src = next(synthetic_dir.glob(f"HAM10000_images_part_*/{image_id}.jpg"))
        (images / src.name).write_bytes(src.read_bytes())
    return PrepareOptions(
        metadata=tmp_path / "meta.csv", images=(images,), out=tmp_path / "out", image_size=32, min_shards=3, workers=1
    )
