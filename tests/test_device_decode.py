"""data.decode=device: the worker ships bytes + geometry, the device decodes; same tiles as the CPU decode.

On the CPU the device half runs the same code with device="cpu" and the same libjpeg-turbo, so its tiles
must equal `train_crop`'s exactly for the same draws. On CUDA, nvJPEG's IDCT and upsampling differ from
libjpeg-turbo's by a few grey levels, so the GPU test allows JPEG tolerance.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_train, tiny_shards, write_shards
from PIL import Image

from skinlesion.data import device_decode
from skinlesion.data.device_decode import decode_batch, header_size, pack, resolve_decode, unpack
from skinlesion.data.images import process_bytes
from skinlesion.data.lesions import make_lesion, render
from skinlesion.data.pipeline import BadSample, collate, decode_sample, decoder, train_loader
from skinlesion.data.transforms import train_crop
from skinlesion.errors import UserError

SIZE = 32


def _jpeg(width: int, height: int, seed: int) -> bytes:
    """A synthetic lesion (real JPEG content: edges, texture, colour) at width x height."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    render(make_lesion(rng, "mel"), rng).resize((width, height)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    # Landscape, portrait, odd sizes and one smaller than the tile: each exercises the crop box's clamping.
    return [_jpeg(w, h, i) for i, (w, h) in enumerate([(96, 72), (72, 96), (101, 67), (45, 30), (64, 64)])]


def _samples(kind: str, jpegs: list[bytes], seed: int) -> list[dict]:
    torch.manual_seed(seed)
    decode = decoder(kind, SIZE)
    raw = [{"jpg": j, "cls": b"3", "__key__": f"k{i}", "__url__": "t.tar"} for i, j in enumerate(jpegs)]
    return [decode_sample(sample, decode) for sample in raw]


def test_device_decode_gives_train_crops_tiles_for_the_same_draws(jpegs: list[bytes]) -> None:
    for seed in range(3):
        torch.manual_seed(seed)
        crop = train_crop(SIZE)
        expected = [crop(j) for j in jpegs]
        batch = decode_batch(collate(_samples("jpeg", jpegs, seed)), torch.device("cpu"))
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (len(jpegs), 3, SIZE, SIZE)
        assert torch.equal(batch["image"], torch.stack([tile for tile, _ in expected]))
        assert torch.equal(batch["affine"], torch.stack([affine for _, affine in expected]))
        assert batch["label"].tolist() == [3] * len(jpegs) and batch["key"] == [f"k{i}" for i in range(len(jpegs))]
        assert batch["skipped"] == 0 and not set(device_decode.SHIPPED) & set(batch)


def test_on_real_images_when_present(shared_sample: Path) -> None:
    jpegs = [process_bytes(p.read_bytes(), 96) for p in sorted((shared_sample / "images").glob("*.jpg"))[:8]]
    torch.manual_seed(0)
    crop = train_crop(SIZE)
    expected = torch.stack([crop(j)[0] for j in jpegs])
    assert torch.equal(decode_batch(collate(_samples("jpeg", jpegs, 0)), torch.device("cpu"))["image"], expected)


def test_the_loader_ships_bytes_and_the_same_views_as_the_cpu_decode(tmp_path: Path) -> None:
    """Through the real loader, in a worker process: same keys, same tiles, same affines, fewer bytes."""
    shards = write_shards(tmp_path, {"train": [12, 12], "val": [4]})
    common = dict(image_size=SIZE, batch_size=6, num_workers=1, rank=0, world_size=1, seed=4, epoch=1, batches=4)
    cpu = list(train_loader(shards, augment="device", **common))
    shipped = list(train_loader(shards, augment="jpeg", **common))
    assert len(shipped) == 4 and "image" not in shipped[0]
    assert shipped[0]["jpeg"].dtype == torch.uint8 and shipped[0]["jpeg"].dim() == 1
    assert shipped[0]["box"].shape == (6, 4) and shipped[0]["size"].shape == (6, 2)
    for want, got in zip(cpu, shipped, strict=True):
        got = decode_batch(got, torch.device("cpu"))
        assert got["key"] == want["key"] and torch.equal(got["label"], want["label"])
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["affine"], want["affine"])


def test_pack_keeps_each_images_bytes() -> None:
    blobs = [b"\xff\xd8abc", b"", b"\xff\xd8" + bytes(range(256))]
    flat, offsets = pack(blobs)
    assert offsets.tolist() == [0, 5, 5, 263] and [bytes(t.numpy()) for t in unpack(flat, offsets)] == blobs


def _truncated(data: bytes) -> bytes:
    """The header (size included) parses; the image data is gone: only a full decode finds out."""
    return data[: data.index(b"\xff\xda")]


def test_an_image_that_only_fails_the_full_decode_is_dropped_and_counted(jpegs: list[bytes], caplog) -> None:
    broken = [jpegs[0], _truncated(jpegs[1]), *jpegs[2:]]
    assert header_size(broken[1]) == (96, 72)
    with caplog.at_level("WARNING"):
        batch = decode_batch(collate(_samples("jpeg", broken, 0)), torch.device("cpu"))
    assert batch["key"] == ["k0", "k2", "k3", "k4"] and batch["skipped"] == 1
    assert batch["image"].shape[0] == batch["affine"].shape[0] == len(batch["label"]) == len(batch["meta"]) == 4
    assert "does not decode" in caplog.text and "k1" in caplog.text


def test_an_image_whose_size_is_not_its_headers_is_dropped(jpegs: list[bytes]) -> None:
    batch = collate(_samples("jpeg", jpegs, 0))
    batch["size"][2] = torch.tensor([7, 9])  # the crop box was drawn for another image
    assert decode_batch(batch, torch.device("cpu"))["key"] == ["k0", "k1", "k3", "k4"]


def test_a_batch_of_mostly_undecodable_images_is_an_error_naming_one(jpegs: list[bytes]) -> None:
    broken = [_truncated(j) for j in jpegs[:3]] + jpegs[3:]
    with pytest.raises(UserError, match=r"3 of 5 images of a batch do not decode .*'k0'.*rerun `skinlesion prepare`"):
        decode_batch(collate(_samples("jpeg", broken, 0)), torch.device("cpu"))


def test_a_file_that_is_not_a_jpeg_is_a_bad_sample_in_the_worker() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, format="PNG")
    with pytest.raises(BadSample, match=r"sample 'p' in t\.tar: its image does not decode"):
        decode_sample({"jpg": buf.getvalue(), "cls": b"1", "__key__": "p", "__url__": "t.tar"}, decoder("jpeg", 16))


def test_auto_keeps_the_cpu_without_cuda_and_device_needs_device_augmentation() -> None:
    cpu = torch.device("cpu")
    assert resolve_decode("auto", "device", cpu) == "cpu" and resolve_decode("cpu", "device", cpu) == "cpu"
    assert resolve_decode("device", "device", cpu) == "device"
    with pytest.raises(UserError, match=r"data.decode=device needs data.augment=device"):
        resolve_decode("device", "cpu", cpu)
    assert not device_decode.gpu_decoder_available(cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_tiles_match_the_cpu_decode_within_jpeg_tolerance(jpegs: list[bytes]) -> None:
    cuda = torch.device("cuda")
    assert resolve_decode("auto", "device", cuda) == "device"
    batch = collate(_samples("jpeg", jpegs, 0))
    on_cpu = decode_batch(dict(batch), torch.device("cpu"))["image"].float()
    on_gpu = decode_batch(dict(batch), cuda)["image"].cpu().float()
    # nvJPEG against libjpeg-turbo: a few grey levels per pixel, well inside one JPEG round-trip.
    assert (on_gpu - on_cpu).abs().mean() < 2 and (on_gpu - on_cpu).abs().max() <= 32


@pytest.mark.slow
def test_training_with_decode_device_gives_the_same_run_as_decode_cpu(tmp_path: Path) -> None:
    """data.decode=device through the real trainer (on the CPU, where decode_jpeg runs libjpeg-turbo too): the
    device decode cuts the same tiles from the same draws, so two epochs train to the same weights."""
    shards = tiny_shards(tmp_path / "shards")
    weights = {}
    for decode in ("cpu", "device"):
        out = tmp_path / decode
        done = run_train(out, shards, f"data.decode={decode}", "data.augment=device", "data.num_workers=1")
        assert done.returncode == 0, done.stderr[-2000:]
        weights[decode] = torch.load(out / "model.pt", weights_only=True)
    assert (
        max((weights["cpu"][k].float() - weights["device"][k].float()).abs().max().item() for k in weights["cpu"])
        < 1e-5
    )
