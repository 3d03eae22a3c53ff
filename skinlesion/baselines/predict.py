"""Prediction throughput and latency on this machine: batched vs one image at a time, and cold start.

    skinlesion bench predict --arch resnet50 --image-size 224 --images 64

All variants run in this one process on the same random-weight checkpoint and the same 600x450
JPEGs (HAM10000's size), so the ratios compare like with like:
  * batched:        `predict_images(..., batch_size=8)`: what `skinlesion predict a.jpg b.jpg ...` does;
  * one at a time:  the same loaded model, batch_size=1 (a loop calling the model per image);
  * latency:        median wall time of one image through the loaded model (decode + preprocess + forward);
  * cold start:     one `skinlesion predict` process for one image (interpreter, imports, model load):
                    what running the tool once per image would cost on top of the latency.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import models

from skinlesion.labels import CLASSES
from skinlesion.model import load_for_inference
from skinlesion.predict import predict_images


def make_inputs(folder: Path, arch: str, image_size: int, n_images: int) -> tuple[Path, list[Path]]:
    """A best.pt for `arch` and `n_images` noisy 600x450 JPEGs with a blob in the middle."""
    torch.manual_seed(0)
    state = getattr(models, arch)(num_classes=len(CLASSES)).state_dict()
    checkpoint = folder / "best.pt"
    torch.save({"model": state, "arch": arch, "classes": list(CLASSES), "image_size": image_size}, checkpoint)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:450, :600]
    paths = []
    for i in range(n_images):
        blob = ((yy - 225) ** 2 + (xx - 300) ** 2 < rng.integers(60, 180) ** 2)[..., None]
        pixels = rng.normal(190, 20, (450, 600, 3)) - blob * rng.uniform(60, 120, 3)
        path = folder / f"img_{i:04d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return checkpoint, paths


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="skinlesion bench predict", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--latency-runs", type=int, default=10)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, paths = make_inputs(Path(tmp), args.arch, args.image_size, args.images)
        load_s = timed(lambda: load_for_inference(checkpoint))
        loaded = load_for_inference(checkpoint)
        predict_images(loaded, paths[:2], batch_size=2)  # warm-up: first-call allocations, lazy init

        batched_s = timed(lambda: predict_images(loaded, paths, batch_size=args.batch_size))
        single_s = timed(lambda: predict_images(loaded, paths, batch_size=1))
        latencies = []
        for path in paths[: args.latency_runs]:
            latencies.append(timed(lambda p=path: predict_images(loaded, [p], batch_size=1)))
        cli = [sys.executable, "-m", "skinlesion", "predict", "--checkpoint", str(checkpoint), str(paths[0])]
        cold_s = timed(lambda: subprocess.run(cli, check=True, capture_output=True))

    n = len(paths)
    print(f"{args.arch} at {args.image_size} px, {n} JPEGs 600x450, torch threads {torch.get_num_threads()}, CPU")
    print("| variant | images/s | ratio |")
    print("|---|---|---|")
    print(f"| one image at a time (baseline) | {n / single_s:.1f} | 1.00x |")
    print(f"| batched (batch {args.batch_size}) | {n / batched_s:.1f} | {single_s / batched_s:.2f}x |")
    print(f"\nsingle-image latency, model loaded: median {statistics.median(latencies) * 1000:.0f} ms")
    print(f"model load (best.pt): {load_s * 1000:.0f} ms")
    print(f"cold start, one `skinlesion predict` process for one image: {cold_s:.1f} s")


if __name__ == "__main__":
    main()
