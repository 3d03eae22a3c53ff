"""Prediction throughput and latency on this machine: batched vs one image at a time, and cold start.

    skinlesion bench predict --arch resnet50 --image-size 224 --images 64

All variants run in this one process on the same random-weight checkpoint and the same 600x450
JPEGs (HAM10000's size), so the ratios compare like with like:
  * batched:        `predict_images(..., batch_size=8)`: what `skinlesion predict a.jpg b.jpg ...` does;
  * one at a time:  the same loaded model, batch_size=1 (a loop calling the model per image);
  * latency:        median wall time of one image through the loaded model (decode + preprocess + forward);
  * cold start:     one `skinlesion predict` process for `--cold-images` images (interpreter, imports, model
                    and model-card load): what a dermatologist waits for at the command line. The median of
                    `--cold-runs` processes, split into its phases (imports of torch, torchvision and skinlesion,
                    the rest), with the heavy packages the process imported (none of accelerate, W&B, pandas,
                    scikit-learn or matplotlib should be). `--against DIR` times another checkout's `predict`
                    (e.g. the commit before a change) in the same run, alternating with this one.

    skinlesion bench predict --checkpoint runs/demo/best.pt --cold-images 6 --against ../main
"""

from __future__ import annotations

import argparse
import json
import os
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


# Run as `python -c`: time each import phase and the whole `skinlesion predict`, report heavy modules (JSON, stderr).
_PROBE = """
import json, sys, time
start = time.perf_counter()
import torch
t_torch = time.perf_counter()
import torchvision
t_vision = time.perf_counter()
from skinlesion.cli import main
import skinlesion.predict
t_ours = time.perf_counter()
code = main(sys.argv[1:])
end = time.perf_counter()
heavy = [m for m in ("accelerate", "wandb", "pandas", "sklearn", "matplotlib", "webdataset") if m in sys.modules]
print(json.dumps({"code": code, "total": end - start, "torch": t_torch - start, "torchvision": t_vision - t_torch,
                  "skinlesion": t_ours - t_vision, "run": end - t_ours, "heavy": heavy}), file=sys.stderr)
"""


def cold_start(root: Path, checkpoint: Path, paths: list[Path]) -> dict:
    """One `skinlesion predict` process with `root` first on the path, timed by phase (see _PROBE)."""
    env = os.environ | {"PYTHONPATH": str(root)}
    cli = [sys.executable, "-c", _PROBE, "predict", "--checkpoint", str(checkpoint), *map(str, paths)]
    done = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=root)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    if report["code"] not in (0, None):
        raise RuntimeError(f"predict under {root} exited {report['code']}: {done.stderr[-500:]}")
    return report


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
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="cold start with this checkpoint (and its model card) instead of the random one",
    )
    parser.add_argument("--cold-images", type=int, default=6, help="images per cold-start process (default 6)")
    parser.add_argument("--cold-runs", type=int, default=3, help="cold-start processes per checkout (median)")
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        help="another skinlesion checkout (its root) whose predict start-up is timed in the same run",
    )
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parents[2]

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
        cold_checkpoint = args.checkpoint.resolve() if args.checkpoint else checkpoint
        roots = {"this checkout": here} | ({"--against": args.against.resolve()} if args.against else {})
        colds: dict[str, list[dict]] = {name: [] for name in roots}
        for _ in range(args.cold_runs):  # alternating, so a busy spell on the machine hits both alike
            for name, root in roots.items():
                colds[name].append(cold_start(root, cold_checkpoint, paths[: args.cold_images]))

    n = len(paths)
    print(f"{args.arch} at {args.image_size} px, {n} JPEGs 600x450, torch threads {torch.get_num_threads()}, CPU")
    print("| variant | images/s | ratio |")
    print("|---|---|---|")
    print(f"| one image at a time (baseline) | {n / single_s:.1f} | 1.00x |")
    print(f"| batched (batch {args.batch_size}) | {n / batched_s:.1f} | {single_s / batched_s:.2f}x |")
    print(f"\nsingle-image latency, model loaded: median {statistics.median(latencies) * 1000:.0f} ms")
    print(f"model load (best.pt): {load_s * 1000:.0f} ms")
    print(
        f"\ncold start, one `skinlesion predict` process for {args.cold_images} images ({cold_checkpoint.name}), "
        f"median of {args.cold_runs}:"
    )
    print("| checkout | total s | import torch | import torchvision | import skinlesion | load + predict | heavy |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in colds.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("total", "torch", "torchvision", "skinlesion", "run")}
        heavy = ", ".join(runs[0]["heavy"]) or "none"
        print(
            f"| {name} ({roots[name]}) | {med['total']:.2f} | {med['torch']:.2f} | {med['torchvision']:.2f} | "
            f"{med['skinlesion']:.2f} | {med['run']:.2f} | {heavy} |"
        )


if __name__ == "__main__":
    main()
