"""Two machines' worth of `accelerate launch` on loopback: one 2-process job, and no hang when a rank dies.

This is exactly what each node of slurm/train.sbatch runs (launch/multi-node.yaml plus the job's geometry on
the command line), without SLURM: machine ranks 0 and 1 rendezvous at 127.0.0.1. A rank that dies (a node
lost, OOM-killed) must make the survivors fail within a bounded time (train.dist_timeout_s), never hang the
allocation until the wall-clock limit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY_MODEL, free_port, kill_tree, wait_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TINY = [*TINY_MODEL, "wandb.mode=disabled"]


@pytest.fixture
def machines(tmp_path: Path, shards_dir: Path) -> Iterator[Callable[..., list[subprocess.Popen]]]:
    """Start machine ranks 0 and 1 (each an `accelerate launch`); kills whatever is left at teardown."""
    started: list[subprocess.Popen] = []

    def start(out: Path, *overrides: str) -> list[subprocess.Popen]:
        port = str(free_port())
        env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        for rank in (0, 1):
            cmd = [
                str(BIN / "accelerate"),
                "launch",
                "--config_file",
                str(REPO / "launch/multi-node.yaml"),
                "--num_processes",
                "2",
                "--num_machines",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
                "--mixed_precision",
                "no",
                "-m",
                "skinlesion",
                "train",
                "--config",
                str(REPO / "configs/smoke.yaml"),
                f"data.shards={shards_dir}",
                f"train.output_dir={out}",
                *TINY,
                *overrides,
            ]
            log = (tmp_path / f"machine{rank}.log").open("w")
            started.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
            time.sleep(0.5)  # machine 0 first: it hosts the rendezvous store
        return started

    yield start
    for proc in started:
        kill_tree(proc.pid)


def log_tail(tmp_path: Path, rank: int) -> str:
    return (tmp_path / f"machine{rank}.log").read_text(errors="replace")[-3000:]


def test_two_machine_ranks_form_one_job(machines: Callable[..., list], tmp_path: Path) -> None:
    out = tmp_path / "run"
    procs = machines(out, "train.epochs=1", "data.batch_size=20")
    for rank, proc in enumerate(procs):
        assert proc.wait(timeout=300) == 0, log_tail(tmp_path, rank)

    runtime = yaml.safe_load((out / "config.yaml").read_text())["runtime"]
    assert runtime["world_size"] == 2
    assert (out / "model.pt").is_file()


def test_a_dead_rank_fails_the_other_instead_of_hanging(machines: Callable[..., list], tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Far more epochs than the test waits for: the survivor can only stop by noticing the dead peer.
    rank0, rank1 = machines(out, "train.epochs=200", "train.dist_timeout_s=20")
    # config.yaml is written once the process group exists, i.e. both ranks joined and training starts.
    wait_for(lambda: (out / "config.yaml").is_file(), 240, "the 2-process group to form")
    time.sleep(2)
    kill_tree(rank1.pid)

    started = time.monotonic()
    try:
        status = rank0.wait(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rank 0 still running 180 s after rank 1 died:\n{log_tail(tmp_path, 0)}")
    assert status != 0, log_tail(tmp_path, 0)
    assert not (out / "model.pt").exists()
    print(f"rank 0 exited with status {status} {time.monotonic() - started:.1f} s after rank 1 was killed")
