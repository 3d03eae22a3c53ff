"""Benchmark `skinlesion prepare` against a plain single-process loop over the same images.

    skinlesion bench prepare [--images 10015] [--image-size 256] [--data data/bench-synthetic]

Both sides read the same synthetic 600x450 JPEGs (generated once into --data if missing) and
produce JPEGs whose shorter side is --image-size. The baseline is the obvious loop: open, convert
to RGB, resize, re-encode, one image after another in one process (it writes nothing, so it does
less than prepare). prepare runs as the real command in a subprocess, start-up included, and also
cleans, splits, and writes the shards and manifest. Prints one markdown table row per run.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from skinlesion.data.synthetic import FOLDERS, generate


def baseline(files: list[Path], size: int) -> tuple[float, float]:
    """The notebook's way: one process, full decode, resize, re-encode. Returns wall and CPU seconds."""
    start, cpu = time.perf_counter(), time.process_time()
    for path in tqdm(files, desc="baseline", unit="img", file=sys.stderr):
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        w, h = rgb.size
        scale = size / min(w, h)
        small = rgb.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        small.save(io.BytesIO(), format="JPEG", quality=90)
    return time.perf_counter() - start, time.process_time() - cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_prepare(data: Path, out: Path, size: int, workers: int | None) -> tuple[float, float, list[str]]:
    cmd = ["skinlesion", "prepare", "--metadata", str(data / "HAM10000_metadata.csv")]
    cmd += [arg for folder in FOLDERS for arg in ("--images", str(data / folder))]
    cmd += ["--out", str(out), "--image-size", str(size), "--overwrite"]
    if workers:
        cmd += ["--workers", str(workers)]
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run([sys.executable, "-m", "skinlesion", *cmd[1:]], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, _children_cpu() - cpu, cmd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="skinlesion bench prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_015)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--data", type=Path, default=Path("data/bench-synthetic"))
    parser.add_argument("--out", type=Path, default=Path("data/bench-shards"))
    args = parser.parse_args(argv)

    csv = args.data / "HAM10000_metadata.csv"
    if not csv.exists() or sum(1 for _ in csv.open()) - 1 != args.images:
        shutil.rmtree(args.data, ignore_errors=True)
        start = time.perf_counter()
        generate(args.data, n_images=args.images, seed=0)
        print(f"synth: {args.images} images in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    files = sorted(p for folder in FOLDERS for p in (args.data / folder).glob("*.jpg"))
    cores = os.cpu_count()
    print(
        f"{len(files)} images 600x450 -> shorter side {args.image_size}; {cores} cores; "
        f"load average before: {os.getloadavg()[0]:.1f}"
    )

    base, base_cpu = baseline(files, args.image_size)
    print("| run | wall s | images/s | speed-up (wall) | CPU s (all processes) |\n|---|---|---|---|---|")
    print(f"| baseline loop (1 process) | {base:.1f} | {len(files) / base:.0f} | 1.00x | {base_cpu:.1f} |")
    commands = []
    for workers in (1, None):
        seconds, cpu, cmd = run_prepare(args.data, args.out, args.image_size, workers)
        label = f"`skinlesion prepare`, {workers or cores} worker process{'es' if workers != 1 else ''}"
        print(f"| {label} | {seconds:.1f} | {len(files) / seconds:.0f} | {base / seconds:.2f}x | {cpu:.1f} |")
        commands.append(" ".join(cmd))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print("\n".join(commands))


if __name__ == "__main__":
    main()
