"""Small builders shared by several test modules (fixtures live in conftest.py), and the SLURM test helpers."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from skinlesion.data.prepare import PrepareOptions


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


# SLURM: tests/test_slurm.py and tests/test_sweep.py submit jobs to the local cluster (slurm/local-cluster.sh).
REPO = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=32", "data.batch_size=8", "data.eval_batch_size=32", "data.num_workers=0",
        "model.name=resnet18", "train.log_every_steps=1"]  # fmt: skip
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
        cmd = ["sbatch", "--parsable", "--time=10", f"--output={log_dir}/{log_name}", *(["--wait"] if wait else []),
               *args]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=job_env | (env or {}))
        job_id = int(done.stdout.split()[0].split(";")[0]) if done.stdout.strip() else -1
        self.jobs.append(job_id)
        return job_id, done


def job_info(job_id: int | str) -> dict[str, str]:
    """scontrol's fields of a job (an array task as "JOB_TASK"); {} once SLURM has forgotten it."""
    done = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, timeout=20)
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def job_log(tmp_path: Path, job_id: int | str) -> str:
    return "".join(p.read_text(errors="replace") for p in tmp_path.glob(f"*-{job_id}.out"))
