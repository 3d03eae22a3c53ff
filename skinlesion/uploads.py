"""Uploads to `skinlesion serve`, bounded while they stream in, and one file's bytes turned into model input.

A request's bytes are counted as they arrive, whatever the framing (Content-Length or chunked), and it stops
with 413 past --max-files x (--max-mb + PART_SLACK); the parser stops at file --max-files + 1; of each file at
most --max-mb + 1 byte is kept, below the spool size, so an upload never reaches a temporary file on disk.
Uploads are patients' data: nothing here logs them or their names.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import torch
from PIL import Image
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

from skinlesion import inference
from skinlesion.model import LoadedModel

PART_SLACK = 1_000_000  # bytes per file allowed beyond --max-mb in a request (headers; a file a little too large)
MAX_FIELDS, FIELD_BYTES = 16, 64 * 1024  # non-file form fields: the API reads none, so keep them small


def decode_upload(
    data: bytes, max_bytes: int, size: int | None = None, *, loaded: LoadedModel
) -> tuple[tuple[torch.Tensor, tuple[int, int]] | None, str | None, str]:
    """((model input, (width, height) it was cropped from), None, format) or (None, reason, format) for one
    uploaded file's bytes, through `inference.file_to_input` with `loaded`'s facts: predict's and evaluate's
    pixels. `size` is the whole upload's size when only its first max_bytes + 1 bytes were read."""
    from skinlesion.data.images import BadImage

    if len(data) > max_bytes:
        total = max(size or 0, len(data))
        return None, f"too large ({total / 1e6:.1f} MB; the limit is {max_bytes / 1e6:g} MB)", "?"
    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind = probe.format or "?"
    except Exception:  # anything PIL cannot even identify; file_to_input says why below
        kind = "?"
    try:
        facts = (loaded.image_size, loaded.shard_size, loaded.jpeg_quality)
        return inference.file_to_input(data, *facts), None, kind
    except BadImage as exc:
        return None, str(exc), kind


class TooLarge(Exception):
    """The request body passed its byte limit while streaming in."""


async def _bounded(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """`stream`, stopped with TooLarge as soon as more than `limit` bytes have arrived (whatever the framing)."""
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise TooLarge
        yield chunk


class UploadParser(MultiPartParser):
    """starlette's multipart parser, bounded while the body streams in.

    It stops at file `max_files` + 1 (starlette's own count, made as each part's headers arrive). Of each file
    it keeps at most `max_bytes` + 1 bytes, which is the spool size, so no upload rolls over into a temporary
    file on disk; the rest is counted (`received`) and dropped, and `decode_upload` answers "too large".
    """

    def __init__(self, request: Request, limit: int, max_files: int, max_bytes: int) -> None:
        body = _bounded(request.stream(), limit)
        super().__init__(request.headers, body, max_files=max_files, max_fields=MAX_FIELDS, max_part_size=FIELD_BYTES)
        self.spool_max_size = max_bytes + 1  # SpooledTemporaryFile rolls over only when it holds more than this
        self.max_bytes = max_bytes
        self.received: dict[int, int] = {}  # id(UploadFile) -> bytes that arrived for it, kept or not

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        upload = self._current_part.file
        if upload is None:  # a plain form field: starlette's own size limit (FIELD_BYTES)
            return super().on_part_data(data, start, end)
        seen = self.received.get(id(upload), 0)
        self.received[id(upload)] = seen + end - start
        keep = min(end, start + max(0, self.max_bytes + 1 - seen))
        if keep > start:
            super().on_part_data(data, start, keep)

    def too_many_files(self) -> bool:
        return self._current_files > self.max_files
