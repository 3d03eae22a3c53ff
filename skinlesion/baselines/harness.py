"""Harness overhead: skinlesion's training step vs a bare PyTorch loop, same model, same batches.

Both sides train the same architecture from the same seed on the same pre-decoded batches held in
memory (so the loader is not measured; see `skinlesion bench files` for that) with the same math: AdamW,
label-smoothed cross entropy, gradient clipping. The harness side is the real `skinlesion.train.train`
(Accelerate, per-step LR, the per-step agreement all-reduce, logging, tqdm) with its loader replaced by
the in-memory batches and validation stubbed out; only its `train_epoch` is timed. Alternating
repeats, best of --repeats.

    skinlesion bench harness --shards shards --arch resnet18 --image-size 64 --batch-size 32 --steps 20
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

import skinlesion.train as harness
from skinlesion.config import load_config
from skinlesion.data.pipeline import train_loader
from skinlesion.evaluate import EvalResult
from skinlesion.metrics import compute_metrics
from skinlesion.model import build_model


def bare_loop(batches: list[dict], arch: str, lr: float) -> float:
    """Seconds per step of the loop a user would write by hand."""
    torch.manual_seed(0)
    model = build_model(arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss = criterion(model(batch["image"]), batch["label"])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(batches)


def harness_loop(batches: list[dict], shards: Path, arch: str, image_size: int, lr: float) -> float:
    """Seconds per step of skinlesion's train_epoch over the same batches."""
    timings: list[float] = []
    real_epoch = harness.train_epoch

    def timed_epoch(run, state, batches):
        start = time.perf_counter()
        result = real_epoch(run, state, batches)
        timings.append((time.perf_counter() - start) / run.batches)
        return result

    untimed = compute_metrics(np.arange(7), np.eye(7), n_bootstrap=0)  # validation is not what is timed
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"data.shards={shards}",
            f"train.output_dir={out}",
            f"model.name={arch}",
            "train.epochs=1",
            f"data.image_size={image_size}",
            f"data.batch_size={len(batches[0]['label'])}",
            f"train.lr={lr}",
            "wandb.mode=disabled",
            "train.log_every_steps=10",
        ]
        cfg = load_config(Path(__file__).resolve().parents[2] / "configs/smoke.yaml", overrides)
        samples = len(batches) * cfg.data.batch_size  # make the epoch exactly len(batches) steps
        described = harness.read_manifest(shards)  # its classes and description; only the sample count is stubbed
        # The trainer as is, fed the in-memory batches: only its loader, manifest and validation are stubbed.
        with mock.patch.multiple(
            harness,
            train_loader=lambda *args, **kwargs: iter(batches),
            train_epoch=timed_epoch,
            read_manifest=lambda path: {**described, "splits": {"train": {"samples": samples}}},
            verify_split=lambda *args, **kwargs: None,
            validate=lambda *args, **kwargs: EvalResult(metrics=untimed, predictions=None, files={}),
        ):
            harness.train(cfg)
    return timings[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="skinlesion bench harness", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=Path("shards"))
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    loader = train_loader(
        args.shards,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=0,
        rank=0,
        world_size=1,
        seed=0,
        epoch=0,
        batches=args.steps,
    )
    batches = list(itertools.islice(loader, args.steps))
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(batches, args.arch, 1e-3))
        ours.append(harness_loop(batches, args.shards, args.arch, args.image_size, 1e-3))
    print(
        f"{args.arch}, {args.image_size} px, batch {args.batch_size}, {args.steps} steps, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}"
    )
    print(f"bare PyTorch loop: {min(bare) * 1000:8.1f} ms/step")
    print(f"skinlesion train : {min(ours) * 1000:8.1f} ms/step")
    print(f"ratio harness / bare: {min(ours) / min(bare):.2f}x")


if __name__ == "__main__":
    main()
