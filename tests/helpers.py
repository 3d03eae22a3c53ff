"""Builders and runners shared by several test modules (fixtures live in conftest.py).

Test modules import from here, never from each other: `write_shards` makes tiny colour-coded shards,
`run_train` / `start_train` run `python -m skinlesion train` as a user would, `TINY` holds the overrides
that make a run take seconds on a CPU."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import webdataset as wds
from PIL import Image

from skinlesion.data.prepare import PrepareOptions
from skinlesion.labels import CLASSES


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's signature)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def small_options(synthetic_dir: Path, tmp_path: Path, n: int = 120) -> PrepareOptions:
    """Options for a quick run on the first n rows of the session's synthetic dataset (images copied)."""
    rows = pd.read_csv(synthetic_dir / "HAM10000_metadata.csv", dtype=str).head(n)
    rows.to_csv(tmp_path / "meta.csv", index=False)
    images = tmp_path / "images"
    images.mkdir()
    for image_id in rows["image_id"]:
        src = next(synthetic_dir.glob(f"HAM10000_images_part_*/{image_id}.jpg"))
        (images / src.name).write_bytes(src.read_bytes())
    return PrepareOptions(
        metadata=tmp_path / "meta.csv", images=(images,), out=tmp_path / "out", image_size=32, min_shards=3, workers=1
    )


def prepare_args(
    opts: PrepareOptions, *extra: str, out: Path | str | None = None, size: int | None = None
) -> list[str]:
    """`skinlesion prepare`'s arguments for `opts` (its first image folder), `--out` and `--image-size` overridable."""
    args = ["prepare", "--metadata", str(opts.metadata), "--images", str(opts.images[0])]
    return [*args, "--out", str(out or opts.out), "--image-size", str(size or opts.image_size), *extra]


REPO = Path(__file__).resolve().parents[1]
# A ResNet-18 at 32 px, batch 8, no loader workers: seconds per epoch on one CPU core.
TINY_MODEL = [
    "data.image_size=32",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "model.name=resnet18",
    "train.log_every_steps=1",
]
TINY = [*TINY_MODEL, "data.shuffle_buffer=16", "train.epochs=2", "train.warmup_epochs=0.5", "wandb.mode=disabled"]
STEPS_PER_EPOCH = 7  # tiny_shards: 56 train samples // batch 8


# Distinct mean colours per class: learnable by resnet18 in a handful of steps.
_COLOURS = np.array(
    [[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [200, 40, 200], [40, 200, 200], [120, 120, 120]]
)


def write_shards(out: Path, shards: dict[str, list[int]], size: int = 40, seed: int = 0) -> Path:
    """Write {split: [samples per shard, ...]} as prepare would (tars + manifest.json); classes cycle."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, counts in shards.items():
        files, class_counts, index = [], Counter(), 0
        for number, count in enumerate(counts):
            name = f"{split}-{number:06d}.tar"
            with wds.TarWriter(str(out / name)) as sink:
                for _ in range(count):
                    label = index % len(CLASSES)
                    pixels = _COLOURS[label] + rng.normal(0, 25, (size, size, 3))
                    buf = io.BytesIO()
                    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG")
                    meta = {"image_id": f"ISIC_{index:07d}", "dx": CLASSES[label]}
                    sink.write(
                        {
                            "__key__": f"{split}_{index:06d}",
                            "jpg": buf.getvalue(),
                            "cls": str(label).encode(),
                            "json": json.dumps(meta).encode(),
                        }
                    )
                    class_counts[CLASSES[label]] += 1
                    index += 1
            files.append(name)
        splits[split] = {
            "samples": sum(counts),
            "shards": len(counts),
            "files": files,
            "shard_samples": counts,
            "class_counts": dict(class_counts),
        }
    manifest = {"classes": list(CLASSES), "splits": splits, "image_size": size, "seed": seed}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def tiny_shards(out: Path) -> Path:
    """56 train (8 per class), 14 val and 7 test samples at 36 px."""
    return write_shards(out, {"train": [14, 14, 14, 14], "val": [7, 7], "test": [7]}, size=36)


def env(**extra: str) -> dict[str, str]:
    """One thread per process (2 shared cores) and no W&B network access."""
    return os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"} | extra


def train_cmd(out: Path, shards: Path, *overrides: str, tiny: bool = True) -> list[str]:
    """`skinlesion train` of the smoke recipe into `out`; `tiny` shrinks it to seconds (TINY), else as shipped."""
    recipe = ["--config", str(REPO / "configs/smoke.yaml"), f"data.shards={shards}", f"train.output_dir={out}"]
    return [sys.executable, "-m", "skinlesion", "train", *recipe, *(TINY if tiny else ()), *overrides]


def run_train(out: Path, shards: Path, *overrides: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(out, shards, *overrides), capture_output=True, text=True, timeout=timeout, env=env(), cwd=out.parent
    )


def start_train(out: Path, shards: Path, *overrides: str) -> subprocess.Popen:
    """A training in the background, in its own session (so a test can signal or kill the whole group)."""
    log = (out.parent / f"{out.name}.log").open("w")  # a file, not a pipe: nobody drains a pipe while we poll
    return subprocess.Popen(
        train_cmd(out, shards, *overrides), env=env(), cwd=out.parent, start_new_session=True, stdout=log, stderr=log
    )


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, min_step: int, timeout: float = 120) -> int:
    """Poll until a complete checkpoint at `min_step` or later exists; return its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*/COMPLETE")]
        if steps and max(steps) >= min_step:
            return max(steps)
        assert proc.poll() is None, (out.parent / f"{out.name}.log").read_text()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no checkpoint at step >= {min_step} within {timeout} s")


def hold_at_first_epoch_end(out: Path) -> None:
    """Make ``<out>/metrics.jsonl`` a named pipe: a new run that appends its first epoch's line blocks in open()
    (until a reader comes, and none does), holding its lock and its checkpoints of epoch 0's steps. A test that
    races a running training then does not depend on the machine's speed: the run stands still for as long as the
    test needs. Remove the pipe (``unlink``) before another run writes metrics into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    os.mkfifo(out / "metrics.jsonl")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and its workers (torchrun starts each worker in its own session, so no killpg)."""
    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def dataset_files(folder: Path) -> dict[str, bytes]:
    """A folder's files and their bytes, without `.lock`: each run rewrites it with its own pid and start time
    (to the second, so comparing it fails whenever two runs straddle a second)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


# Headless Chromium as root on a machine with no network: without the background-networking flags it tries (and
# fails) to reach Google's hosts at every start. Used by the browser tests and tests/screenshots.py.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# SLURM: tests/test_slurm.py and tests/test_sweep.py submit jobs to the local cluster (slurm/local-cluster.sh).
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def cluster_nodes() -> int:
    """Nodes of the default partition that can run jobs; 0 when no cluster answers."""
    if shutil.which("sinfo") is None:
        return 0
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    states = dict(line.split() for line in done.stdout.splitlines() if line.strip()) if done.returncode == 0 else {}
    return sum(state.rstrip("*") in ("idle", "mixed", "allocated", "completing") for state in states.values())


class Cluster:
    """Submits from the repository root, as a user would, with job logs in `log_dir`."""

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes
        self.jobs: list[int] = []

    def submit(
        self, *args: str, log_dir: Path, env: dict | None = None, wait: bool = False, log_name: str = "%x-%j.out"
    ) -> tuple[int, subprocess.CompletedProcess]:
        # The job inherits this environment (sbatch --export=ALL): the venv's python and accelerate come first.
        job_env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
        job_env.pop("WANDB_MODE", None)  # the script's default (offline) is under test
        cmd = [
            "sbatch",
            "--parsable",
            "--time=10",
            f"--output={log_dir}/{log_name}",
            *(["--wait"] if wait else []),
            *args,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=job_env | (env or {}))
        job_id = int(done.stdout.split()[0].split(";")[0]) if done.stdout.strip() else -1
        self.jobs.append(job_id)
        return job_id, done


def job_info(job_id: int | str) -> dict[str, str]:
    """scontrol's fields of a job (an array task as "JOB_TASK"); {} once SLURM has forgotten it."""
    done = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, timeout=20)
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def job_log(tmp_path: Path, job_id: int | str) -> str:
    return "".join(p.read_text(errors="replace") for p in tmp_path.glob(f"*-{job_id}.out"))


def serve_client(checkpoint: Path, base_url: str = "http://127.0.0.1:8000", **settings: object):
    """FastAPI's test client for `skinlesion serve` of `checkpoint`, addressed as a browser on this machine
    addresses the server (Host: 127.0.0.1:8000)."""
    from fastapi.testclient import TestClient

    from skinlesion.serve import Settings, create_app

    return TestClient(create_app(Settings(checkpoint, **settings)), base_url=base_url)


def post_files(client, files: list[tuple[str, bytes]], query: str = "", headers: dict | None = None):
    """POST `files` (name, bytes) to /api/predict as the page does."""
    return client.post(f"/api/predict{query}", files=[("files", (n, d)) for n, d in files], headers=headers or {})


def plain_jpeg(colour=(150, 90, 70), size=(60, 45), mode="RGB", **save) -> bytes:
    """A flat-coloured JPEG: a valid upload with no lesion in it."""
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="JPEG", **save)
    return buf.getvalue()
