"""slurm/train.sbatch and slurm/prepare.sbatch on a real SLURM cluster (`slurm/local-cluster.sh start --nodes 2`).

What a cluster user relies on: CPU DDP inside a job really forms one process group; USR1 before the time
limit leads to checkpoint -> requeue -> resume with every epoch trained once; `--nodes 2` runs one process
per node with distinct machine ranks; a bad config fails at once with a readable message. Skipped when no
cluster answers `sinfo`. Jobs are 1-node unless the test needs 2, so the tests pass on a 1- or 2-node cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import FINISHED, REPO, TINY_MODEL, Cluster, job_info, job_log, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(1800)]  # jobs wait up to 10 min each
TINY = TINY_MODEL  # W&B stays on: its offline default is under test


@pytest.fixture(scope="module")
def job_shards(cluster: Cluster, synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Shards made by slurm/prepare.sbatch as a CPU job (the cluster workflow), small enough for quick training:
    84 train samples (12 per class), ~40 each for val and test. Returns (shards folder, job log)."""
    logs = tmp_path_factory.mktemp("prepare-job")
    out = logs / "shards"
    meta, images = synthetic_dir / "HAM10000_metadata.csv", synthetic_dir / "HAM10000_images_part_{}"
    args = [
        "--metadata",
        str(meta),
        "--images",
        str(images).format(1),
        "--images",
        str(images).format(2),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--samples-per-class",
        "12",
        "--val-fraction",
        "0.1",
        "--test-fraction",
        "0.1",
        "--min-shards",
        "2",
    ]
    job, done = cluster.submit("--cpus-per-task=2", "slurm/prepare.sbatch", *args, log_dir=logs, wait=True)
    log = job_log(logs, job)
    assert done.returncode == 0, log[-4000:]
    return out, log


def epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_args(shards: Path, out: Path, *overrides: str) -> list[str]:
    return [
        "slurm/train.sbatch",
        "configs/smoke.yaml",
        f"data.shards={shards}",
        f"train.output_dir={out}",
        *TINY,
        *overrides,
    ]


def test_prepare_job_writes_shards(job_shards: tuple[Path, str]) -> None:
    out, log = job_shards
    assert "with 2 workers" in log  # one decode process per CPU that SLURM granted
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"]["input"] == 400
    assert manifest["splits"]["train"]["samples"] == 84 and manifest["splits"]["train"]["shards"] >= 2


def test_one_node_trains_with_two_cpu_processes(cluster: Cluster, job_shards: tuple, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = train_args(job_shards[0], out, "train.epochs=1")
    job, done = cluster.submit("--nodes=1", *args, log_dir=tmp_path, env={"NPROC_PER_NODE": "2"}, wait=True)
    log = job_log(tmp_path, job)
    assert done.returncode == 0, log[-4000:]

    assert yaml.safe_load((out / "config.yaml").read_text())["runtime"]["world_size"] == 2
    assert epochs(out) == [0] and (out / "model.pt").is_file()
    assert "2 process(es) of 2 on CPU" in log
    # W&B defaults to offline on the cluster, and the log says how to upload the run afterwards.
    offline = sorted((out / "wandb").glob("offline-run-*"))
    assert offline and f"wandb sync {offline[0]}" in log


def test_usr1_checkpoints_requeues_and_resumes(cluster: Cluster, job_shards: tuple, tmp_path: Path) -> None:
    out = tmp_path / "run"
    n_epochs = 4
    args = train_args(job_shards[0], out, f"train.epochs={n_epochs}", "wandb.mode=disabled")
    job, done = cluster.submit("--nodes=1", *args, log_dir=tmp_path, env={"NPROC_PER_NODE": "2"})
    assert done.returncode == 0, done.stderr
    # Once the first epoch is recorded the run is mid-training with epochs to go: preempt it now, as SLURM's
    # --signal=B:USR1@<lead> would before the time limit.
    wait_for(lambda: (out / "metrics.jsonl").is_file(), 300, f"epoch 0 of job {job}")
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, timeout=20)

    wait_for(lambda: int(job_info(job).get("Restarts", 0)) >= 1, 180, f"job {job} to requeue itself")
    # The requeued job passes through COMPLETING (its old step being cleaned up) before it is PENDING again.
    wait_for(lambda: job_info(job).get("JobState") in ("PENDING", "REQUEUED"), 120, f"job {job} to be pending again")
    # SLURM holds a requeued job ~2 min (BeginTime). Releasing it within the second of the requeue gets the new
    # launch refused ("Job credential revoked"), so let the revocation age a moment first.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True, timeout=20)
    wait_for(lambda: job_info(job).get("JobState") in FINISHED, 420, f"job {job} to finish after the requeue")

    log = job_log(tmp_path, job)
    assert job_info(job)["JobState"] == "COMPLETED", log[-4000:]
    assert "got SIGUSR1" in log and "requeueing job" in log and "(restart 1)" in log
    assert re.search(r"resuming from \S+", log), log[-4000:]
    assert epochs(out) == list(range(n_epochs))  # every epoch exactly once across both attempts
    assert not (out / "preempted").exists()


def test_two_nodes_one_process_each(cluster: Cluster, job_shards: tuple, tmp_path: Path) -> None:
    if cluster.nodes < 2:
        pytest.skip("needs a 2-node cluster: slurm/local-cluster.sh start --nodes 2")
    out = tmp_path / "run"
    args = train_args(job_shards[0], out, "train.epochs=1", "wandb.mode=disabled")
    job, done = cluster.submit("--nodes=2", *args, log_dir=tmp_path, env={"NPROC_PER_NODE": "1"}, wait=True)
    log = job_log(tmp_path, job)
    assert done.returncode == 0, log[-4000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["runtime"]["world_size"] == 2
    # Each node evaluated its own $SLURM_NODEID (an unescaped one makes both machine rank 0 and hangs).
    assert re.search(r"node 0 \(\S+\): 1 process\(es\) of 2", log) and re.search(r"node 1 \(\S+\): 1 process", log)


def test_bad_config_fails_before_any_node_starts(cluster: Cluster, tmp_path: Path) -> None:
    args = ["slurm/train.sbatch", "configs/smoke.yaml", "train.epochz=3"]
    job, done = cluster.submit("--nodes=1", *args, log_dir=tmp_path, wait=True)
    log = job_log(tmp_path, job)
    assert done.returncode != 0
    assert "unknown config key 'train.epochz'" in log and "did you mean 'train.epochs'" in log
    assert "accelerate launch" not in log and "Traceback" not in log


def test_a_checkout_and_output_path_with_spaces(cluster: Cluster, job_shards: tuple, tmp_path: Path) -> None:
    # The script finds launch/ from its own path in the job record; submitted from elsewhere, a path cut at
    # its first space used to fall back to $PWD and fail. The W&B hint must be pasteable as it is printed.
    checkout = tmp_path / "my projects" / "skin lesion"
    for part in ("slurm", "launch", "configs"):
        shutil.copytree(REPO / part, checkout / part)
    out = tmp_path / "runs dir" / "run 1"
    args = [
        str(checkout / "slurm/train.sbatch"),
        str(checkout / "configs/smoke.yaml"),
        f"data.shards={job_shards[0]}",
        f"train.output_dir={out}",
        *TINY,
        "train.epochs=1",
    ]
    job_env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    job_env.pop("WANDB_MODE", None)
    done = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--time=10", f"--output={tmp_path}/%x-%j.out", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=job_env,
    )
    job = int(done.stdout.split()[0].split(";")[0])
    cluster.jobs.append(job)
    log = job_log(tmp_path, job)
    assert done.returncode == 0, log[-4000:]
    assert epochs(out) == [0] and (out / "model.pt").is_file()
    hint = next(line for line in log.splitlines() if line.strip().startswith("wandb sync"))
    runs = [Path(p) for p in shlex.split(hint)[2:]]
    assert runs and all(p.is_dir() and p.parent == out / "wandb" for p in runs), hint
