"""A loader batch -> the model's input on the training device: the device half of the input pipeline.

The loader (`data.pipeline`) ships uint8 tiles and their affines (``augment="device"``), JPEG bytes and their
crop geometry (``data.decode=device``), or augmented floats (``augment="cpu"``); this decodes the bytes on
the device (`data.device_decode`), moves the rest there and, for tiles, runs the per-sample augmentation
there (`data.augment`). Training and `bench train` call the same function, so the benchmark measures the loop.
"""

from __future__ import annotations

from typing import Any

import torch

from skinlesion.data.augment import augment, batch_generator
from skinlesion.data.device_decode import decode_batch

CPU_AUGMENT = "device"  # what data.augment=auto means without CUDA (measured: docs/benchmarks.md)


def model_input(
    batch: dict[str, Any], device: torch.device, seed: int, epoch: int, rank: int, index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch on the device, ready for the model: uint8 tiles are augmented and normalised here, per
    sample, with flips and jitter drawn from (seed, epoch, rank, batch index): a resumed epoch draws the same.
    A batch of JPEG bytes is decoded first (`decoded`)."""
    batch = decoded(batch, device)
    x = batch["image"].to(device, non_blocking=True)
    if "affine" in batch:
        generator = batch_generator(device, seed, epoch, rank, index)
        x = augment(x, batch["affine"].to(device, non_blocking=True), generator)
    elif device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["label"].to(device, non_blocking=True)


def decoded(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A data.decode=device batch decoded on `device` (its ``skipped`` then counts images that failed there
    too); any other batch as it is."""
    return decode_batch(batch, device) if "jpeg" in batch else batch


def resolve_augment(setting: str, device: torch.device) -> str:
    """data.augment=auto: on the device on CUDA, where the loader's CPU time is the bottleneck; on CPU too,
    where it spends less CPU in total (docs/benchmarks.md)."""
    if setting != "auto":
        return setting
    return "device" if device.type == "cuda" else CPU_AUGMENT
