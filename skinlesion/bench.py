"""`skinlesion bench loader|step|train`: the speed story in three commands, each against its own baseline.

- ``loader``: the CPU cost of one training image in a loader worker (read, decode, crop, collate; one
  core), images/s per worker of the real `train_loader`, bytes shipped per image, and the cost of the
  device-side augmentation per batch on the current device. ``--augment cpu`` measures the CPU path, so
  the two can be set side by side in one run.
- ``step``: images/s of forward + backward + optimizer step on in-memory batches on the current device,
  warm-up excluded, the median of several timed windows: what the model can eat.
- ``train``: end-to-end images/s of the real loader + device augmentation + step for N steps, against
  ``step`` with the same settings measured in the same run; the input-bound fraction is
  1 - end-to-end / step-only.

Every command prints a table and, with ``--json FILE``, writes its numbers (keys listed in docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from skinlesion.errors import UserError

_CPU = torch.device("cpu")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _per_image_ms(fn: Callable[[], Any], count: int, repeats: int = 3) -> float:
    """Best of `repeats` of timing `fn` (which handles `count` images), in ms per image."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000 / count


def bench_loader(
    shards: Path, image_size: int, workers: int, batches: int, batch_size: int, augment: str, decode: str = "cpu"
) -> dict:
    """Per-stage CPU cost on one core, the real loader's rate per worker, bytes and device cost per batch.

    With ``decode="device"`` the worker's "decode" is the JPEG header read and its "crop" the geometry draw; the
    decode itself is in ``device_decode_ms_per_batch``, on the current device (the CPU's cost, without CUDA)."""
    from skinlesion.data import transforms
    from skinlesion.data.device_decode import decode_batch, header_size, resolve_decode
    from skinlesion.data.manifest import read_manifest, split_shards
    from skinlesion.data.pipeline import _read, collate, decoder, train_loader

    device = _device()
    kind = "jpeg" if resolve_decode(decode, augment, device) == "device" else augment
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker's view: one core
    try:
        paths = [p for p, _ in split_shards(shards, read_manifest(shards), "train")]
        count = min(batches * batch_size, sum(1 for _ in _read(iter(paths))))

        def read_all() -> list[dict]:
            return list(itertools.islice(_read(iter(paths)), count))

        read = _per_image_ms(read_all, count)
        jpegs = [s["jpg"] for s in read_all()]
        decode_fn = decoder(kind, image_size)
        if kind == "cpu":

            def pil(j: bytes) -> Image.Image:
                with Image.open(io.BytesIO(j)) as im:
                    return im.convert("RGB")

            first_stage = pil
        else:
            first_stage = header_size if kind == "jpeg" else transforms.decode
        decode_ms = _per_image_ms(lambda: [first_stage(j) for j in jpegs], count)
        crop_total = _per_image_ms(lambda: [decode_fn(j) for j in jpegs], count)
        items = [{**decode_fn(j), "label": 0, "key": "k", "meta": {}} for j in jpegs]
        collate_ms = _per_image_ms(
            lambda: [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)], count
        )
    finally:
        torch.set_num_threads(threads)
    ms = {"read": read, "decode": decode_ms, "crop": crop_total - decode_ms, "collate": collate_ms}
    ms["total"] = sum(ms.values())

    loader = train_loader(
        shards,
        image_size=image_size,
        batch_size=batch_size,
        num_workers=workers,
        rank=0,
        world_size=1,
        seed=0,
        epoch=0,
        batches=batches + 1,
        augment=kind,
    )
    it = iter(loader)
    first = next(it)  # worker start-up and the first batch are excluded
    start = time.perf_counter()
    got = sum(len(b["label"]) for b in it)
    rate = got / (time.perf_counter() - start) / max(workers, 1)
    fields = ("image", "affine", "jpeg", "jpeg_offsets", "size", "box")  # what crosses to the device, per kind
    shipped = sum(first[name].nbytes for name in fields if name in first) / len(first["label"])
    decode_ms_batch, diff = None, {}
    if kind == "jpeg":
        decode_ms_batch = _device_ms(lambda: decode_batch(first, device), device)
        # nvJPEG against libjpeg-turbo on the same batch and crops: JPEG tolerance on CUDA, 0 on the CPU.
        delta = (decode_batch(first, device)["image"].cpu().float() - decode_batch(first, _CPU)["image"].float()).abs()
        diff = {"device_decode_max_abs_diff": delta.max().item(), "device_decode_mean_abs_diff": delta.mean().item()}
    augment_ms = _device_augment_ms(first, device) if kind != "cpu" else None
    return {
        "augment": augment,
        "decode": "device" if kind == "jpeg" else "cpu",
        "image_size": image_size,
        "workers": workers,
        "batch_size": batch_size,
        "images": got,
        "images_per_second_per_worker": rate,
        "ms_per_image": ms,
        "bytes_per_image": shipped,
        "device_decode_ms_per_batch": decode_ms_batch,
        "device_augment_ms_per_batch": augment_ms,
        "device": device.type,
        **diff,
    }


def _device_ms(fn: Callable[[], Any], device: torch.device, calls: int = 8) -> float:
    """Median ms of `fn` on `device`, synchronised, after two warm-up calls."""
    times = []
    for _ in range(calls):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1000


def _device_augment_ms(batch: dict, device: torch.device) -> float:
    """The device augmentation of one loader batch (decoded on the device first when it ships JPEG bytes)."""
    from skinlesion.data.augment import augment, batch_generator
    from skinlesion.data.device_decode import decode_batch

    if "jpeg" in batch:
        batch = decode_batch(batch, device)
    x, affine = batch["image"].to(device), batch["affine"].to(device)
    calls = iter(range(100))
    return _device_ms(lambda: augment(x, affine, batch_generator(device, 0, 0, 0, next(calls))), device)


class _Step:
    """One optimizer step of `model` in the given precision: forward, backward, step, zero_grad."""

    def __init__(self, model: nn.Module, precision: str, device: torch.device) -> None:
        self.model, self.device = model, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.criterion = nn.CrossEntropyLoss()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.autocast():
            loss = self.criterion(self.model(x), y)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _model(name: str, channels_last: bool, compile: bool, device: torch.device) -> nn.Module:
    from skinlesion.model import build_model

    torch.manual_seed(0)
    model = build_model(name).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    return torch.compile(model) if compile else model


def bench_step(
    model: str,
    image_size: int,
    batch_size: int,
    precision: str,
    channels_last: bool,
    compile: bool,
    steps: int = 10,
    warmup: int = 3,
    windows: int = 5,
) -> dict:
    """Images/s of whole optimizer steps on one in-memory batch: median of `windows` windows of `steps`."""
    device = _device()
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a GPU; use bf16 or no on the CPU")
    step = _Step(_model(model, channels_last, compile, device), precision, device)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch_size,), device=device)
    for _ in range(warmup):
        step(x, y)
    times = []
    for _ in range(windows):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        _sync(device)
        times.append((time.perf_counter() - start) / steps)
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": model,
        "image_size": image_size,
        "batch_size": batch_size,
        "precision": precision,
        "channels_last": channels_last,
        "compile": compile,
        "images_per_second": batch_size / statistics.median(times),
        "window_seconds": times,
    }


def bench_train(config: Path, overrides: list[str], steps: int, warmup: int = 5) -> dict:
    """End-to-end images/s (loader, device augmentation, step) against `bench_step` with the same settings."""
    from skinlesion.config import load_config
    from skinlesion.data.batches import model_input, resolve_augment
    from skinlesion.data.device_decode import resolve_decode
    from skinlesion.data.manifest import read_manifest
    from skinlesion.data.pipeline import train_loader
    from skinlesion.data.workers import resolve_workers
    from skinlesion.distributed import resolve_mixed_precision

    cfg = load_config(config, overrides)
    device = _device()
    workers = resolve_workers(cfg.data.num_workers, gpu=device.type == "cuda")
    if workers.note:
        print(workers.note, file=sys.stderr)
    cfg.data.num_workers = workers.count
    read_manifest(cfg.data.shards)
    precision = resolve_mixed_precision(cfg.train.mixed_precision)
    augment = resolve_augment(cfg.data.augment, device)
    decode = resolve_decode(cfg.data.decode, augment, device)
    channels_last = device.type == "cuda"
    step = _Step(_model(cfg.model.name, channels_last, cfg.train.compile, device), precision, device)
    loader = train_loader(
        cfg.data.shards,
        image_size=cfg.data.image_size,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        rank=0,
        world_size=1,
        seed=cfg.train.seed,
        epoch=0,
        batches=warmup + steps,
        shuffle_buffer=cfg.data.shuffle_buffer,
        augment=augment,
        decode=decode,
    )
    batches: Iterator[dict] = iter(loader)
    for i, batch in enumerate(itertools.islice(batches, warmup)):
        step(*model_input(batch, device, cfg.train.seed, 0, 0, i))
    _sync(device)
    start, images = time.perf_counter(), 0
    for i, batch in enumerate(batches, start=warmup):
        step(*model_input(batch, device, cfg.train.seed, 0, 0, i))
        images += len(batch["label"])
    _sync(device)
    end_to_end = images / (time.perf_counter() - start)
    only = bench_step(
        cfg.model.name,
        cfg.data.image_size,
        cfg.data.batch_size,
        precision,
        channels_last,
        cfg.train.compile,
        steps=max(2, steps // 5),
    )
    return {
        "images_per_second": end_to_end,
        "step_images_per_second": only["images_per_second"],
        "input_bound_fraction": max(0.0, 1 - end_to_end / only["images_per_second"]),
        "augment": augment,
        "decode": decode,
        "device": only["device"],
        "model": cfg.model.name,
        "image_size": cfg.data.image_size,
        "batch_size": cfg.data.batch_size,
        "workers": cfg.data.num_workers,
        "precision": precision,
        "steps": steps,
    }


def format_result(kind: str, result: dict) -> str:
    """The table a person reads."""
    if kind == "loader":
        ms = result["ms_per_image"]
        aug, dec = result["device_augment_ms_per_batch"], result["device_decode_ms_per_batch"]
        return "\n".join(
            [
                f"loader ({result['decode']} decode, {result['augment']} augmentation, {result['image_size']} px, "
                f"batch {result['batch_size']}, "
                f"{result['workers']} workers)",
                "  ms per image on one core: " + "  ".join(f"{k} {v:.3f}" for k, v in ms.items()),
                f"  {1000 / ms['total']:.0f} images/s per core by the breakdown; real loader "
                f"{result['images_per_second_per_worker']:.0f} images/s per worker",
                f"  {result['bytes_per_image']:.0f} bytes per image to the device"
                + (f"; device decode {dec:.2f} ms per batch on {result['device']}" if dec is not None else "")
                + (f"; device augmentation {aug:.2f} ms per batch on {result['device']}" if aug is not None else ""),
            ]
        )
    if kind == "step":
        return (
            f"step {result['model']} {result['image_size']} px batch {result['batch_size']} {result['precision']}"
            f"{' channels_last' if result['channels_last'] else ''}{' compile' if result['compile'] else ''} "
            f"on {result['device']}: {result['images_per_second']:.1f} images/s"
        )
    return (
        f"train {result['model']} {result['image_size']} px ({result['augment']} augmentation) on "
        f"{result['device']}: {result['images_per_second']:.1f} images/s end to end, "
        f"{result['step_images_per_second']:.1f} step-only; input-bound fraction "
        f"{result['input_bound_fraction']:.2f}"
    )


def bench_command(kind: str, args: Any) -> int:
    """CLI entry for `skinlesion bench KIND`."""
    if kind == "loader":
        sizes = (args.image_size, args.workers, args.batches, args.batch_size)
        result = bench_loader(args.shards, *sizes, args.augment, args.decode)
    elif kind == "step":
        result = bench_step(
            args.model,
            args.image_size,
            args.batch_size,
            args.precision,
            args.channels_last,
            args.compile,
            steps=args.steps,
        )
    else:
        result = bench_train(args.config, args.overrides, args.steps)
    print(format_result(kind, result))
    if args.json:
        from skinlesion.files import atomic_write

        atomic_write(Path(args.json), json.dumps(result, indent=2) + "\n")
    return 0
