"""Train and eval image presets (torchvision.transforms.v2), after torchvision's classification presets.

Dermoscopy has no canonical orientation and varies in zoom, framing and colour calibration between
devices, so training augments exactly those: random resized crops, horizontal and vertical flips,
rotation and colour jitter. Evaluation and prediction use `eval_transform` and nothing else (resize the
shorter side, centre crop), so a checkpoint sees the same pixels in `evaluate`, `predict` and validation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image], torch.Tensor]


def train_transform(image_size: int) -> Transform:
    """Augmenting preset: PIL RGB image -> normalised float tensor [3, image_size, image_size]."""
    return v2.Compose(
        [
            # Geometry and colour on the PIL image: PIL's C code is several times faster than the tensor
            # kernels for these small images (a loader worker decodes, augments and batches on one core).
            v2.RandomRotation(degrees=180, interpolation=v2.InterpolationMode.BILINEAR),
            v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            # No hue shift: lesion colour is diagnostic, and hue is by far the slowest jitter.
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(image_size: int) -> Transform:
    """Deterministic preset: resize the shorter side to `image_size`, centre crop, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
