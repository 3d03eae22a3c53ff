"""Image presets, after torchvision's classification presets: what the CPU does to each image.

Dermoscopy has no canonical orientation and varies in zoom, framing and colour calibration between
devices, so training augments exactly those: random resized crops, horizontal and vertical flips,
rotation and colour jitter.

Two training paths give the same distribution (tests/test_augment.py compares them):

- ``device`` (the default on CUDA): a loader worker only decodes the shard's JPEG with libjpeg-turbo
  (`torchvision.io.decode_jpeg`) and cuts the region a random rotation + resized crop needs, resized
  straight to ``image_size`` as uint8 (`train_crop`). Rotation, flips, jitter and normalisation then
  run on the training device, per sample, in batches (`data.augment.augment`). Batches cross PCIe as
  uint8: a quarter of float32's bytes.
- ``cpu``: `train_transform` does everything in the worker and ships normalised float32.

Evaluation and prediction share one preset whatever the training path: resize the shorter side and
centre-crop to uint8 on the CPU (`eval_crop` for shard bytes, `eval_uint8` for a decoded image), then
`normalize` on the device. So a checkpoint sees the same pixels in `evaluate`, `predict` and validation.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as v1
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# torchvision 0.29 deprecates its JPEG decoder in favour of TorchCodec, which is not on the GPU machines
# (torch 2.11); it is still libjpeg-turbo, the fastest decoder we measured here (docs/benchmarks.md).
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.35, 1.0)  # area fraction of a random resized crop
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.2  # brightness, contrast and saturation factors are drawn from [1 - JITTER, 1 + JITTER]

Transform = Callable[[Image.Image], torch.Tensor]
Decoder = Callable[[bytes], torch.Tensor]


def train_transform(image_size: int) -> Transform:
    """The ``cpu`` path: PIL RGB image -> augmented, normalised float tensor [3, image_size, image_size]."""
    return v2.Compose(
        [
            # Geometry and colour on the PIL image: PIL's C code is several times faster than the tensor
            # kernels for these small images (a loader worker decodes, augments and batches on one core).
            v2.RandomRotation(degrees=180, interpolation=v2.InterpolationMode.BILINEAR),
            v2.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            # No hue shift: lesion colour is diagnostic, and hue is by far the slowest jitter.
            v2.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def decode(data: bytes) -> torch.Tensor:
    """A shard's JPEG bytes -> uint8 RGB [3, H, W] (libjpeg-turbo; shards only ever hold RGB JPEGs)."""
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def train_crop(image_size: int) -> Callable[[bytes], tuple[torch.Tensor, torch.Tensor]]:
    """The ``device`` path's CPU half: JPEG bytes -> (uint8 tile [3, S, S], affine [2, 3]).

    `train_transform` rotates the whole image about its centre, then takes a random resized crop of
    the rotated image. Rotating here would cost what we are saving, so this draws the same angle and
    crop (`crop_geometry`), cuts out the bounding box of the crop's corners in the unrotated image and
    resizes it to S x S (`cut_tile`). `augment` samples the tile through the affine on the device.
    Points outside the image fall outside the tile and come out black, as `train_transform`'s corners
    do, so both give the same pixels up to interpolation.
    """

    def crop(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode(data)
        box, affine = crop_geometry(*image.shape[-2:], image_size)
        return cut_tile(image, box, image_size), affine

    return crop


Box = tuple[int, int, int, int]  # top, left, height, width of the region a tile is cut from


def crop_geometry(height: int, width: int, image_size: int) -> tuple[Box, torch.Tensor]:
    """The random rotation + resized crop of one training view of a `height` x `width` image, as the
    region of the unrotated image to cut out (`cut_tile`) and the affine [2, 3] that maps each output
    pixel to its place in that tile.

    It needs the image's size only, so ``data.decode=device`` draws it in the loader worker from the
    JPEG header and decodes on the device. Random draws use torch's global RNG (angle, then the crop, as
    `train_transform` draws them), which each loader worker seeds per (seed, epoch, slot): both decode
    paths draw the same views.
    """
    angle = math.radians(float(torch.empty(1).uniform_(-180.0, 180.0)))
    # get_params reads only the shape: an empty [0, H, W] tensor stands for the image.
    top, left, h, w = v1.RandomResizedCrop.get_params(torch.empty(0, height, width), CROP_SCALE, CROP_RATIO)
    # Crop-box point q (rotated frame) -> unrotated image point: rotate about the image centre.
    cx, cy, cos, sin = width / 2, height / 2, math.cos(angle), math.sin(angle)
    corners = [(left + dx, top + dy) for dx in (0, w) for dy in (0, h)]
    xs = [cx + cos * (x - cx) - sin * (y - cy) for x, y in corners]
    ys = [cy + sin * (x - cx) + cos * (y - cy) for x, y in corners]
    x0, x1 = max(0, math.floor(min(xs))), min(width, math.ceil(max(xs)))
    y0, y1 = max(0, math.floor(min(ys))), min(height, math.ceil(max(ys)))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    # Output u in [-1, 1]^2 -> crop point q = (left + (u+1) w/2, top + (v+1) h/2) -> image point o ->
    # tile coordinate t = 2 (o - corner) / size - 1: all affine, composed into one [2, 3] matrix.
    ax, ay = w / 2, h / 2  # q = a * u + b
    bx, by = left + w / 2 - cx, top + h / 2 - cy  # q - centre
    ox = [cos * ax, -sin * ay, cx + cos * bx - sin * by]
    oy = [sin * ax, cos * ay, cy + sin * bx + cos * by]
    sx, sy = 2 / (x1 - x0), 2 / (y1 - y0)
    affine = torch.tensor(
        [
            [sx * ox[0], sx * ox[1], sx * (ox[2] - x0) - 1],
            [sy * oy[0], sy * oy[1], sy * (oy[2] - y0) - 1],
        ]
    )
    return (y0, x0, y1 - y0, x1 - x0), affine


def cut_tile(image: torch.Tensor, box: Box, image_size: int) -> torch.Tensor:
    """uint8 [3, H, W] on any device -> the `box` region resized to S x S, antialiased (the one downscale)."""
    top, left, height, width = box
    return F.resized_crop(image, top, left, height, width, [image_size, image_size], antialias=True)


def eval_uint8(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> shorter side resized to `image_size` (antialiased), centre crop, still uint8."""
    return F.center_crop(F.resize(image, [image_size], antialias=True), [image_size, image_size])


def eval_crop(image_size: int) -> Decoder:
    """JPEG bytes from a shard -> the evaluation preset, uint8 [3, image_size, image_size]."""
    return lambda data: eval_uint8(decode(data), image_size)


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """A decoded RGB PIL image (predict's files) -> uint8 [3, H, W]."""
    return F.pil_to_tensor(image)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S], or float in [0, 1], on any device -> float32 with ImageNet normalisation."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mean, std = _imagenet_stats(x.device)
    return (x - mean) / std


@functools.cache
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: `torch.tensor(..., device="cuda")` at every batch would be a blocking copy that
    makes the CPU wait for the GPU (measured on an H200: 0.20 of the training step lost; docs/benchmarks.md)."""
    return (
        torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1),
    )
