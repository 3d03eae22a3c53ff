"""The device path augments like the CPU path it replaces, and evaluation preprocessing did not move.

The statistical test: many augmented views of one image through `train_transform` (the CPU path) and
through `train_crop` + `augment` (the device path); per view, the per-channel mean and standard deviation
of the normalised image. The two samples of each statistic must agree by the two-sample Kolmogorov-Smirnov
distance. With 1,000 views a side, the KS critical value is 1.95 * sqrt(2 / 1000) = 0.087 at alpha = 0.001,
and 0.10 corresponds to alpha of about 2e-4: a correct implementation fails none of the 6 comparisons
except by chance (and the draws are seeded, so the test is deterministic). Measured: 0.02-0.035 on real
HAM10000 images. The same test rejects a jitter of 0.5 instead of 0.2, and a device path that rotates the
crop about its own centre instead of the whole image (more black corners): it can fail.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import v2

from skinlesion.data import augment as device_augment
from skinlesion.data import transforms
from skinlesion.data.images import process_bytes
from skinlesion.data.lesions import make_lesion, render

VIEWS, SIZE, TOLERANCE = 1000, 48, 0.10


@pytest.fixture(scope="module")
def lesion_jpeg() -> bytes:
    """A synthetic melanoma as prepare stores it: a JPEG whose shorter side is 96 px."""
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    render(make_lesion(rng, "mel"), rng).save(buf, format="JPEG", quality=95)
    return process_bytes(buf.getvalue(), 96)


def _cpu_views(data: bytes) -> torch.Tensor:
    torch.manual_seed(0)
    preset = transforms.train_transform(SIZE)
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
        return torch.stack([preset(rgb) for _ in range(VIEWS)])


def _device_views(data: bytes, rotate_crop_only: bool = False) -> torch.Tensor:
    torch.manual_seed(1)
    crop = transforms.train_crop(SIZE)
    tiles, affines = zip(*(crop(data) for _ in range(VIEWS)), strict=True)
    affine = torch.stack(affines)
    if rotate_crop_only:  # the naive design: crop, then rotate the crop about its own centre
        angle = torch.rand(VIEWS) * 2 * math.pi
        tiles = [transforms.eval_crop(SIZE)(data) for _ in range(VIEWS)]  # any full-frame crop will do
        affine = torch.zeros(VIEWS, 2, 3)
        affine[:, 0, 0], affine[:, 0, 1] = angle.cos(), -angle.sin()
        affine[:, 1, 0], affine[:, 1, 1] = angle.sin(), angle.cos()
    return device_augment.augment(torch.stack(list(tiles)), affine, torch.Generator().manual_seed(2))


def _distances(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    out = {}
    for name, stat in (("mean", lambda x: x.mean(dim=(2, 3))), ("std", lambda x: x.std(dim=(2, 3)))):
        sa, sb = stat(a).numpy(), stat(b).numpy()
        for c in range(3):
            out[f"{name}[{c}]"] = float(ks_2samp(sa[:, c], sb[:, c]).statistic)
    return out


def test_device_augmentation_matches_the_cpu_distribution(lesion_jpeg: bytes) -> None:
    distances = _distances(_cpu_views(lesion_jpeg), _device_views(lesion_jpeg))
    assert max(distances.values()) < TOLERANCE, distances


def test_the_test_rejects_a_wider_jitter(lesion_jpeg: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_augment, "JITTER", 0.5)
    distances = _distances(_cpu_views(lesion_jpeg), _device_views(lesion_jpeg))
    assert max(distances.values()) > TOLERANCE, distances


def test_the_test_rejects_rotating_the_crop_instead_of_the_image(lesion_jpeg: bytes) -> None:
    distances = _distances(_cpu_views(lesion_jpeg), _device_views(lesion_jpeg, rotate_crop_only=True))
    assert max(distances.values()) > TOLERANCE, distances


def test_on_real_images_when_present(shared_sample: Path) -> None:
    images = sorted((shared_sample / "images").glob("*.jpg"))[:2]
    for path in images:
        data = process_bytes(path.read_bytes(), 128)
        distances = _distances(_cpu_views(data), _device_views(data))
        assert max(distances.values()) < TOLERANCE, (path.name, distances)


def test_parameters_are_per_sample_and_reproducible() -> None:
    tile = torch.full((1, 3, 16, 16), 128, dtype=torch.uint8).expand(64, 3, 16, 16).contiguous()
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(64, 2, 3)
    out = device_augment.augment(tile, identity, torch.Generator().manual_seed(0))
    means = out.mean(dim=(1, 2, 3))
    assert means.unique().numel() > 32  # a jitter drawn per sample, not one per batch
    again = device_augment.augment(tile, identity, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_evaluation_preprocessing_agrees_with_the_previous_path_within_a_jpeg_round_trip(lesion_jpeg: bytes) -> None:
    """Before: PIL decode -> Resize(antialias) -> CenterCrop -> float -> Normalize, all in the loader.
    Now: libjpeg-turbo decode -> the same resize and crop in uint8 -> normalise on the device."""
    previous = v2.Compose([v2.ToImage(), v2.Resize(SIZE, antialias=True), v2.CenterCrop(SIZE),
                           v2.ToDtype(torch.float32, scale=True), v2.Normalize(transforms.IMAGENET_MEAN,
                                                                               transforms.IMAGENET_STD)])  # fmt: skip

    def old(data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as image:
            return previous(image.convert("RGB"))

    new = device_augment.to_model_input(transforms.eval_crop(SIZE)(lesion_jpeg)[None])[0]
    round_trip = io.BytesIO()
    Image.open(io.BytesIO(lesion_jpeg)).save(round_trip, format="JPEG", quality=90)
    jpeg_noise = (old(round_trip.getvalue()) - old(lesion_jpeg)).abs().mean()
    assert (new - old(lesion_jpeg)).abs().mean() < jpeg_noise
