"""Resume: exact at an epoch boundary, no epoch twice after SIGKILL, clean stop and restart on SIGUSR1."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import (
    STEPS_PER_EPOCH,
    hold_at_first_epoch_end,
    metrics,
    run_train,
    start_train,
    tiny_shards,
    wait_for,
    wait_for_checkpoint,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("tiny") / "shards")


EMA = "train.ema_decay=0.9"


@pytest.fixture(scope="module")
def finished(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run with an EMA, for tests that copy it (read-only: copy before changing)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = run_train(out, shards, EMA)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


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
    """The signal arrives while the run is held at the end of epoch 0 (its metrics.jsonl is a named pipe that
    the test reads when it chooses), so the run is in epoch 1 when it sees it, however fast the machine."""
    out = tmp_path / "run"
    hold_at_first_epoch_end(out)
    proc = start_train(out, shards)
    wait_for(lambda: (out / "eval-val" / "metrics.json").is_file() or proc.poll() is not None, 120, "validation")
    proc.send_signal(signal.SIGUSR1)
    with (out / "metrics.jsonl").open() as pipe:  # lets the run go on: it appends epoch 0's line, then stops
        first_line = pipe.read()
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").write_text(first_line)
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


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["data.image_size=40", "train.lr=0.02"], "data.image_size: 32 -> 40"),
        (["train.ema_decay=0"], "train.ema_decay: 0.9 -> 0.0"),
    ],
)
def test_a_resume_with_another_recipe_is_refused_and_changes_nothing(
    shards: Path, finished: Path, tmp_path: Path, change: list[str], named: str
) -> None:
    """Issue 16: a copied run trained on with other settings would mix two recipes under one config.yaml. The
    checkpoint keeps the recipe; a resume that changes it stops with one line, and writes nothing. Keys a
    resume may change (train.epochs here) are accepted."""
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    before = {p.name: p.read_bytes() for p in (copy / "config.yaml", copy / "model.pt", copy / "metrics.jsonl")}
    done = run_train(copy, shards, EMA, "train.epochs=3", *change)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "another recipe" in done.stderr and named in done.stderr and "Traceback" not in done.stderr
    assert {p: (copy / p).read_bytes() for p in before} == before
    done = run_train(copy, shards, EMA, "train.epochs=3")  # a longer run: allowed
    assert done.returncode == 0, done.stderr[-2000:]
    assert [m["epoch"] for m in metrics(copy)] == [0, 1, 2]


def test_a_metrics_line_cut_short_by_a_crash_does_not_stop_the_resume(
    shards: Path, finished: Path, tmp_path: Path
) -> None:
    """Issue 16: a crash mid-append leaves half a line in metrics.jsonl; every later resume died on it."""
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    first_epoch = finished / "checkpoints" / f"step-{STEPS_PER_EPOCH:08d}"
    shutil.copytree(first_epoch, resumed / "checkpoints" / first_epoch.name)
    lines = (finished / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    done = run_train(resumed, shards, EMA)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dropped its last line, cut short" in done.stderr
    assert [m["epoch"] for m in metrics(resumed)] == [0, 1]
