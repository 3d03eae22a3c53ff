"""``data.decode=device``: loader workers ship JPEG bytes and crop geometry; the training device decodes.

On an 8-GPU box each GPU needs about 6,000 training images/s, and decoding a JPEG costs a CPU core about
1 ms: the decode, not the augmentation, is then what the loader workers spend their time on. With this
option a worker only reads the JPEG header for the image size (PIL's lazy `Image.open`, which stops at the
frame header) and draws the view's rotation + random resized crop with `transforms.crop_geometry`, from
the same RNG and in the same order as `transforms.train_crop` does for ``data.decode=cpu``. It ships the
bytes, the size, the region to cut out and the affine. On the device, `decode_batch` decodes the whole
batch in one `torchvision.io.decode_jpeg(list, device=...)` call (nvJPEG on CUDA), cuts each image's
region and resizes it, antialiased, to the tile size (`transforms.cut_tile`). What comes out is what a
``data.decode=cpu`` batch carries: uint8 tiles and their affines, for `augment.augment`.

The bytes travel as one flat uint8 tensor plus offsets, not one tensor per image: a worker hands each
tensor to the main process through its own shared-memory segment, and `pin_memory` pins each one, so one
per batch costs a fraction of 128. `decode_jpeg` wants its input on the CPU even when it decodes on the
GPU (nvJPEG stages the bytes itself), so the offsets split the flat tensor into views there, with no copy.

A JPEG whose header does not parse is skipped in the worker, like any undecodable sample. One whose header
parses but whose data does not decode on the device is retried on the CPU and, when it fails there too
(or decodes to another size than its header said), dropped from its batch and counted in the batch's
``skipped``: the batch is one image smaller, every rank still takes the same number of steps.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from skinlesion.data.transforms import crop_geometry, cut_tile
from skinlesion.errors import UserError

log = logging.getLogger(__name__)
Batch = dict[str, Any]
SHIPPED = ("jpeg", "jpeg_offsets", "size", "box", "tile_size")  # the batch keys `decode_batch` replaces


def resolve_decode(setting: str, augment: str, device: torch.device) -> str:
    """data.decode -> "device" or "cpu". ``auto`` is ``device`` on CUDA when torchvision's GPU JPEG decoder
    works there and augmentation runs on the device too, else ``cpu``. `augment` is the resolved
    data.augment: the device decode hands its tiles to the device augmentation, so ``data.decode=device``
    with ``data.augment=cpu`` is a contradiction, reported as such."""
    if setting == "device" and augment != "device":
        raise UserError(
            "data.decode=device needs data.augment=device (or auto): the images are decoded on the device, "
            "so they are augmented there; set data.augment=device or data.decode=cpu"
        )
    if setting != "auto":
        return setting
    return "device" if augment == "device" and gpu_decoder_available(device) else "cpu"


@functools.cache
def gpu_decoder_available(device: torch.device) -> bool:
    """Whether `decode_jpeg(..., device=device)` works: CUDA, and a torchvision built with nvJPEG. Tried on a
    tiny JPEG once per device, because a build without it only says so when asked to decode."""
    if device.type != "cuda":
        return False
    probe = encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8))
    try:
        decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, NotImplementedError) as exc:
        log.info("torchvision cannot decode JPEGs on %s (%s): data.decode=auto decodes on the CPU", device, exc)
        return False
    return True


def header_size(data: bytes) -> tuple[int, int]:
    """(height, width) of a JPEG from its header, without decoding it; OSError for anything else."""
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
        width, height = image.size
    return height, width


def train_geometry(image_size: int) -> Callable[[bytes], dict[str, Any]]:
    """The worker's half: JPEG bytes -> the sample's fields (the bytes, size, crop box, affine, tile size)."""

    def geometry(data: bytes) -> dict[str, Any]:
        height, width = header_size(data)
        box, affine = crop_geometry(height, width, image_size)
        size = torch.tensor([height, width])
        return {"jpeg": data, "size": size, "box": torch.tensor(box), "affine": affine, "tile_size": image_size}

    return geometry


def pack(blobs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """JPEG bytes of a batch -> one flat uint8 tensor and the [B + 1] offsets of each image in it."""
    lengths = torch.tensor([0] + [len(b) for b in blobs])
    return torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8), lengths.cumsum(0)


def unpack(flat: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of `pack`: views of `flat`, one per image, on the CPU (what `decode_jpeg` reads)."""
    bounds = offsets.tolist()
    return [flat[start:end] for start, end in itertools.pairwise(bounds)]


def decode_batch(batch: Batch, device: torch.device) -> Batch:
    """A ``data.decode=device`` loader batch -> the same batch as ``data.decode=cpu`` ships it, on `device`:
    ``image`` uint8 tiles [B, 3, S, S] and ``affine`` [B, 2, 3] (for `augment.augment`), with ``label``, ``key``,
    ``meta`` and ``skipped`` as before; samples that do not decode are dropped and counted in ``skipped``."""
    blobs = unpack(batch["jpeg"].cpu(), batch["jpeg_offsets"].cpu())
    sizes, boxes = batch["size"].tolist(), batch["box"].tolist()  # host tensors: no wait for the device
    if device.type == "cuda":
        side, main = _side_stream(device), torch.cuda.current_stream(device)
        side.synchronize()  # see _side_stream: nothing queued on it may still read a block it freed
        with torch.cuda.stream(side):
            tiles, keep = _tiles(blobs, sizes, boxes, batch["tile_size"], device)
        main.wait_stream(side)  # the training stream reads the tiles once they are cut
        if tiles is not None:
            tiles.record_stream(main)  # and their memory is not reused for the side stream before that
    else:
        tiles, keep = _tiles(blobs, sizes, boxes, batch["tile_size"], device)
    if len(keep) * 2 < len(blobs):  # also when none decoded: a batch of 0 breaks BatchNorm
        raise UserError(
            f"{len(blobs) - len(keep)} of {len(blobs)} images of a batch do not decode (among them sample "
            f"{_dropped(batch, keep)[0]!r}); the shards are damaged: rerun `skinlesion prepare`"
        )
    if len(keep) < len(blobs):
        log.warning("dropped sample(s) whose image does not decode on %s: %s", device, ", ".join(_dropped(batch, keep)))
    index = torch.tensor(keep)
    out = {key: value for key, value in batch.items() if key not in SHIPPED}
    out["image"] = tiles
    out["affine"] = batch["affine"].index_select(0, index.to(batch["affine"].device))
    out["label"] = batch["label"].index_select(0, index.to(batch["label"].device))
    for key in ("key", "meta"):
        out[key] = [batch[key][i] for i in keep]
    out["skipped"] = batch.get("skipped", 0) + len(blobs) - len(keep)
    return out


def _tiles(
    blobs: list[torch.Tensor], sizes: list[list[int]], boxes: list[list[int]], size: int, device: torch.device
) -> tuple[torch.Tensor | None, list[int]]:
    """Decode, cut and stack the images that decode to the size their header gave; and which ones those are."""
    images = _decode(blobs, device)
    keep = [i for i, image in enumerate(images) if image is not None and list(image.shape[-2:]) == sizes[i]]
    if not keep:
        return None, keep
    return torch.stack([cut_tile(images[i], tuple(boxes[i]), size) for i in keep]), keep


def _dropped(batch: Batch, keep: list[int]) -> list[str]:
    kept = set(keep)
    return [key for i, key in enumerate(batch["key"]) if i not in kept]


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream the device decode runs on, one per device.

    torchvision's CUDA decoder allocates its output on the current stream, then writes it from a private
    stream that does not wait for the current one (pytorch/vision PR 9606, not merged; nvJPEG's hardware
    engine also ignores stream order, meta-pytorch/torchcodec PR 1634). On the training stream, the caching
    allocator would hand it blocks that the queued forward and backward passes still read, and it would
    overwrite them: silently wrong gradients. On this stream, synchronised before each batch (it holds only
    the last batch's cuts, long done), every free block really is free; the training stream is never
    waited for, so the decode overlaps the previous step on the GPU.
    """
    return torch.cuda.Stream(device=device)


def _decode(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """All of a batch in one call; if that fails, one by one, so that one bad image costs only itself."""
    try:
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        return [_decode_one(blob, device) for blob in blobs]


def _decode_one(blob: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One image on the device, else on the CPU (libjpeg-turbo takes some files nvJPEG refuses), else None."""
    for where in dict.fromkeys([device, torch.device("cpu")]):
        try:
            return decode_jpeg(blob, mode=ImageReadMode.RGB, device=where).to(device)
        except RuntimeError:
            continue
    return None
