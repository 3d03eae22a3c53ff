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
from torchvision.transforms.v2 import functional as F

from skinlesion.data import augment as device_augment
from skinlesion.data import transforms
from skinlesion.data.images import process_bytes
from skinlesion.data.lesions import make_lesion, render
from skinlesion.data.transforms import JITTER

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


def test_jitter_is_torchvisions_colour_jitter_per_sample() -> None:
    """The batched jitter is, sample by sample, torchvision's adjust_brightness/contrast/saturation applied in
    the drawn order with the drawn factors (the generator is replayed to read the draws)."""
    batch = 24
    tiles = torch.randint(0, 256, (batch, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(batch, 2, 3)
    out = device_augment.augment(tiles, identity, torch.Generator().manual_seed(9))

    replay = torch.Generator().manual_seed(9)
    flips = [torch.rand(batch, generator=replay) < 0.5 for _ in range(2)]  # horizontal, vertical
    factors = [1 - JITTER + 2 * JITTER * torch.rand(batch, generator=replay) for _ in range(3)]
    order = torch.rand(batch, 3, generator=replay).argsort(dim=1)
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    for i in range(batch):
        x = tiles[i].float() / 255
        x = x.flip(-1) if flips[0][i] else x
        x = x.flip(-2) if flips[1][i] else x
        for op in order[i].tolist():
            x = adjust[op](x, factors[op][i].item())
        expected = transforms.normalize(x[None])[0]
        assert torch.allclose(out[i], expected, atol=1e-5), i


def test_augmentation_makes_no_tensor_from_host_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, a tensor built from Python data is a blocking host-to-device copy: the CPU waits for the GPU
    at every batch. An H200 lost 0.20 of its training step to eight of them (docs/benchmarks.md)."""
    tiles = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(4, 2, 3)
    device_augment.augment(tiles, identity, torch.Generator().manual_seed(0))  # constants made once

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.tensor called per batch")

    monkeypatch.setattr(torch, "tensor", refuse)
    device_augment.augment(tiles, identity, torch.Generator().manual_seed(1))
    transforms.normalize(tiles)


def test_evaluation_preprocessing_agrees_with_the_previous_path_within_a_jpeg_round_trip(lesion_jpeg: bytes) -> None:
    """Before: PIL decode -> Resize(antialias) -> CenterCrop -> float -> Normalize, all in the loader.
    Now: libjpeg-turbo decode -> the same resize and crop in uint8 -> normalise on the device."""
    previous = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(SIZE, antialias=True),
            v2.CenterCrop(SIZE),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD),
        ]
    )

    def old(data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as image:
            return previous(image.convert("RGB"))

    new = device_augment.to_model_input(transforms.eval_crop(SIZE)(lesion_jpeg)[None])[0]
    round_trip = io.BytesIO()
    Image.open(io.BytesIO(lesion_jpeg)).save(round_trip, format="JPEG", quality=90)
    jpeg_noise = (old(round_trip.getvalue()) - old(lesion_jpeg)).abs().mean()
    assert (new - old(lesion_jpeg)).abs().mean() < jpeg_noise
