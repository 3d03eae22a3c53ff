"""Resume: exact at an epoch boundary, no epoch twice after SIGKILL, clean stop and restart on SIGUSR1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import REPO, TINY, env, metrics, run_train, tiny_shards

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 7  # 56 train samples // batch 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("tiny") / "shards")


def start_train(out: Path, shards: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "skinlesion", "train", "--config", str(REPO / "configs/smoke.yaml"),
           f"data.shards={shards}", f"train.output_dir={out}", *TINY, *overrides]  # fmt: skip
    log = (out.parent / f"{out.name}.log").open("w")  # a file, not a pipe: nobody drains a pipe while we poll
    return subprocess.Popen(cmd, env=env(), cwd=out.parent, start_new_session=True, stdout=log, stderr=log)


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


def test_resuming_at_an_epoch_boundary_reproduces_the_uninterrupted_weights(shards: Path, tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_train(whole, shards).returncode == 0  # 2 epochs; keeps the checkpoints of both epoch ends
    (resumed / "checkpoints").mkdir(parents=True)
    first_epoch = whole / "checkpoints" / f"step-{STEPS_PER_EPOCH:08d}"
    shutil.copytree(first_epoch, resumed / "checkpoints" / first_epoch.name)

    done = run_train(resumed, shards)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {resumed / 'checkpoints' / first_epoch.name}" in done.stdout
    assert [m["epoch"] for m in metrics(resumed)] == [1]
    a = torch.load(whole / "model.pt", weights_only=True)
    b = torch.load(resumed / "model.pt", weights_only=True)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5


def test_a_run_killed_mid_epoch_resumes_and_trains_every_epoch_once(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start_train(out, shards, "train.epochs=3", "train.checkpoint_every_steps=2", "train.keep_checkpoints=5")
    wait_for_checkpoint(proc, out, STEPS_PER_EPOCH + 1)  # a mid-epoch checkpoint of epoch 1
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (out / "checkpoints" / ".tmp-step-99999999").mkdir()  # what a kill during a save leaves: must be ignored

    done = run_train(out, shards, "train.epochs=3", "train.checkpoint_every_steps=2", "train.keep_checkpoints=5")
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout
    lines = metrics(out)
    assert [m["epoch"] for m in lines] == [0, 1, 2]
    assert lines[-1]["step"] == 3 * STEPS_PER_EPOCH  # no step repeated or skipped


def test_sigusr1_checkpoints_writes_preempted_and_exits_0_then_resume_finishes(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start_train(out, shards)
    wait_for_checkpoint(proc, out, STEPS_PER_EPOCH)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 0, (out.parent / "run.log").read_text()

    preempted = json.loads((out / "preempted").read_text())
    assert preempted["signal"] == "SIGUSR1" and preempted["epoch"] == 1
    assert (out / "checkpoints" / f"step-{preempted['step']:08d}" / "COMPLETE").is_file()
    assert not (out / "model.pt").exists()

    done = run_train(out, shards)
    assert done.returncode == 0, done.stderr
    assert [m["epoch"] for m in metrics(out)] == [0, 1]
    assert metrics(out)[-1]["step"] == 2 * STEPS_PER_EPOCH
    assert not (out / "preempted").exists() and (out / "model.pt").is_file()
