"""Per-sample random augmentation of uint8 batches on the training device, then normalisation.

The ``device`` path's second half (see `data.transforms`): the loader ships, per image, a uint8 tile
and the affine that maps output pixels into it (the rotation + random resized crop drawn in the
worker), and this module applies on the GPU, in one batched pass, what `train_transform` applies per
image on the CPU, with the same ranges:

- the rotation + crop, with the horizontal and vertical flips (p = 0.5 each) folded into the same
  affine matrix: one `affine_grid` + `grid_sample` (bilinear, black outside the image) for all three;
- brightness, contrast and saturation factors drawn from [0.8, 1.2], applied in an order drawn per
  sample, as `ColorJitter` does per image (torchvision's formulas: blend with black, with the mean
  grey level, with the grey image; clamped to [0, 1]);
- ImageNet normalisation, and channels_last on CUDA.

Nothing in it reads a value back or copies host data to the device, so the CPU never waits for the GPU here:
it queues the augmentation and the next forward pass while the GPU is still in the last backward pass. Eight
such blocking copies per batch cost an H200 0.20 of its step time (docs/benchmarks.md).

Every parameter is drawn per sample. torchvision's v2 transforms draw one set per call, i.e. one for a
whole batch. kornia draws per sample but would be one more dependency (absent on the GPU machines) for
formulas that fit on a screen; `affine_grid`/`grid_sample` are PyTorch's own batched kernels.
tests/test_augment.py checks statistically that the two paths give the same distribution.

Flips and jitter come from a generator seeded per batch by the caller (`batch_generator`), so training
is reproducible and a resumed epoch draws what the uninterrupted one drew.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as nnf

from skinlesion.data.transforms import JITTER, normalize

_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _grey(images: torch.Tensor) -> torch.Tensor:
    """torchvision's grey level, [B, 1, H, W]. Python-number weights: a weight tensor made on a CUDA device at
    every call is a blocking host-to-device copy, and each one stalls the CPU until the GPU has caught up."""
    r, g, b = images.unbind(dim=1)
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(1)


def augment(images: torch.Tensor, affine: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 tiles [B, 3, S, S] and their affines [B, 2, 3] (from `transforms.train_crop`), on the device ->
    augmented, normalised float32 [B, 3, S, S]; flips and jitter drawn per sample from `generator`.

    Nothing here waits for the GPU: no value comes back to the host, so the CPU queues this batch's work
    and goes on to the next step while the GPU is still busy with the last one."""
    batch, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, device=device, generator=generator)

    x = images.float().div_(255)
    # A flip of the output is a sign change of its coordinate, applied before the rotation + crop affine.
    flips = torch.ones(batch, 3, device=device)
    flips[:, 0] = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    flips[:, 1] = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    theta = affine.to(device=device, dtype=torch.float32) * flips[:, None, :]  # scales the u and v columns
    grid = nnf.affine_grid(theta, list(x.shape), align_corners=False)
    x = nnf.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # ColorJitter's three blends, each `clamp(f * x + (1 - f) * other)` with other = black (brightness), the
    # mean grey level (contrast) or the grey image (saturation), in an order drawn per sample. At each of the
    # three positions a sample has exactly one of them, so one pass computes all samples' blends with
    # per-sample coefficients: x' = clamp(f * x + (1 - f) * [contrast] * mean + (1 - f) * [saturation] * grey).
    factors = torch.stack([uniform(1 - JITTER, 1 + JITTER) for _ in range(3)], dim=1)  # [B, op]
    order = torch.rand(batch, 3, device=device, generator=generator).argsort(dim=1)  # [B, position] -> op
    for position in range(3):
        op = order[:, position : position + 1]
        f = factors.gather(1, op)
        rest = (1 - f) * torch.cat([op == 1, op == 2], dim=1)  # (1 - f) on the chosen op's "other", else 0
        grey = _grey(x)
        other = rest[:, 0].view(-1, 1, 1, 1) * grey.mean(dim=(2, 3), keepdim=True) + rest[:, 1].view(-1, 1, 1, 1) * grey
        x = torch.addcmul(other, f.view(-1, 1, 1, 1), x).clamp_(0, 1)
    return to_model_input(x)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float in [0, 1]) -> normalised float32, channels_last on CUDA: what the model takes."""
    out = normalize(images)
    return out.contiguous(memory_format=torch.channels_last) if out.device.type == "cuda" else out


def batch_seed(seed: int, epoch: int, rank: int, batch: int, purpose: str = "") -> int:
    """A seed that is a function of where the batch is in the run only (and of what it seeds), so a resumed
    epoch draws what the uninterrupted one drew."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{rank}/{batch}{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batch_generator(device: torch.device, seed: int, epoch: int, rank: int, batch: int) -> torch.Generator:
    """The generator for one batch's augmentation."""
    generator = torch.Generator(device=device)
    generator.manual_seed(batch_seed(seed, epoch, rank, batch))
    return generator
