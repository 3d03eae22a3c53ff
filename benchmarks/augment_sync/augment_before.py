"""The device augmentation as of commit fb3cce2, frozen as the baseline of compare.py: eight blocking
host-to-device copies per batch (two in normalize, six in _grey) and nine masked blends. Not imported by
skinlesion.

Its original docstring:

Per-sample random augmentation of uint8 batches on the training device, then normalisation.

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

from skinlesion.data.transforms import IMAGENET_MEAN, IMAGENET_STD, JITTER


def normalize(images: torch.Tensor) -> torch.Tensor:  # the previous commit's transforms.normalize
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _grey(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_GREY, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * images + (1 - factor) * other).clamp_(0, 1)


def augment(images: torch.Tensor, affine: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 tiles [B, 3, S, S] and their affines [B, 2, 3] (from `transforms.train_crop`), on the device ->
    augmented, normalised float32 [B, 3, S, S]; flips and jitter drawn per sample from `generator`."""
    batch, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, device=device, generator=generator)

    x = images.float() / 255
    # A flip of the output is a sign change of its coordinate, applied before the rotation + crop affine.
    flips = torch.ones(batch, 3, device=device)
    flips[:, 0] = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    flips[:, 1] = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    theta = affine.to(device=device, dtype=torch.float32) * flips[:, None, :]  # scales the u and v columns
    grid = nnf.affine_grid(theta, list(x.shape), align_corners=False)
    x = nnf.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    factors = [uniform(1 - JITTER, 1 + JITTER).view(-1, 1, 1, 1) for _ in range(3)]
    order = torch.rand(batch, 3, device=device, generator=generator).argsort(dim=1)  # a random order per sample
    for position in range(3):
        for op in range(3):
            chosen = (order[:, position] == op).view(-1, 1, 1, 1)
            if op == 0:  # brightness
                changed = _blend(x, torch.zeros_like(x), factors[0])
            elif op == 1:  # contrast
                changed = _blend(x, _grey(x).mean(dim=(2, 3), keepdim=True), factors[1])
            else:  # saturation
                changed = _blend(x, _grey(x), factors[2])
            x = torch.where(chosen, changed, x)
    return to_model_input(x)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float in [0, 1]) -> normalised float32, channels_last on CUDA: what the model takes."""
    out = normalize(images)
    return out.contiguous(memory_format=torch.channels_last) if out.device.type == "cuda" else out


def batch_generator(device: torch.device, seed: int, epoch: int, rank: int, batch: int) -> torch.Generator:
    """The generator for one batch's augmentation: a function of where the batch is in the run only."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{rank}/{batch}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") >> 1)
    return generator
