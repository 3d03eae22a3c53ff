"""No lost work: resume refuses what does not fit, one writer per run folder, best.pt always exists
(issue 8, cases 3, 4, 8 and 14)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import (
    hold_at_first_epoch_end,
    metrics,
    run_train,
    start_train,
    tiny_shards,
    wait_for_checkpoint,
    write_shards,
)
from torchvision.models import resnet18

from skinlesion.checkpoint import TrainerState
from skinlesion.facts import ModelFacts
from skinlesion.labels import CLASSES
from skinlesion.train import _update_best


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("tiny") / "shards")


@pytest.fixture(scope="module")
def finished(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch ResNet-18 run, copied by the tests that try to damage it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = run_train(out, shards)
    assert done.returncode == 0, done.stderr
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run), str(out)], check=True)
    return out


@pytest.mark.slow
def test_resume_auto_into_checkpoints_of_another_model_stops_and_overwrites_nothing(finished, shards, tmp_path):
    out = _copy(finished, tmp_path)
    (out / "model.pt").unlink()  # as if the run had been preempted before its end
    before = _snapshot(out)
    done = run_train(out, shards, "model.name=resnet34", "train.epochs=3")
    assert done.returncode == 2, done.stderr
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert f"error: cannot resume from {newest}: it was saved by a model.name=resnet18 run" in done.stderr
    assert "another train.output_dir" in done.stderr and "Traceback" not in done.stderr
    assert _snapshot(out) == before  # metrics.jsonl, best.pt and the checkpoints untouched


@pytest.mark.slow
def test_checkpoints_that_all_fail_to_load_stop_the_run(finished, shards, tmp_path) -> None:
    out = _copy(finished, tmp_path)
    (out / "model.pt").unlink()
    for weights in (out / "checkpoints").glob("step-*/model.safetensors"):
        weights.write_bytes(b"garbage")
    before = _snapshot(out)
    done = run_train(out, shards, "train.epochs=3")
    assert done.returncode == 2 and "cannot resume from" in done.stderr and "does not load" in done.stderr
    assert "1 older checkpoint(s) failed too" in done.stderr
    assert _snapshot(out) == before


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_one(finished, shards, tmp_path) -> None:
    out = _copy(finished, tmp_path)
    (out / "model.pt").unlink()
    older, newest = sorted((out / "checkpoints").glob("step-*"))
    (newest / "model.safetensors").write_bytes(b"garbage")
    done = run_train(out, shards)
    assert done.returncode == 0, done.stderr
    assert f"skipping checkpoint {newest}" in done.stderr and f"resuming from {older}" in done.stdout
    assert [m["epoch"] for m in metrics(out)] == [0, 1]


@pytest.mark.slow
def test_a_finished_run_without_checkpoints_is_not_started_over(finished, shards, tmp_path) -> None:
    out = _copy(finished, tmp_path)
    subprocess.run(["rm", "-r", str(out / "checkpoints")], check=True)
    before = _snapshot(out)
    done = run_train(out, shards)
    assert done.returncode == 2 and "holds model.pt of a finished run" in done.stderr
    assert _snapshot(out) == before


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_fails_at_once_naming_the_first(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    hold_at_first_epoch_end(out)  # the first run holds the folder, and stands still, at the end of epoch 0
    first = start_train(out, shards, "train.checkpoint_every_steps=1")
    try:
        wait_for_checkpoint(first, out, min_step=1)
        # It returns although the first run never ends: it did not wait for it (nor train beside it).
        second = run_train(out, shards)
        assert second.returncode == 2, second.stderr
        assert f"is in use by host {socket.gethostname()}, PID {first.pid}" in second.stderr
        assert "one folder has one writer" in second.stderr
        assert first.poll() is None
        # kill -9 releases the lock with the process: the next run resumes without any clean-up.
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        (out / "metrics.jsonl").unlink()  # the test's pipe, not a file of the run
        third = run_train(out, shards)
        assert third.returncode == 0, third.stderr
        assert "resuming from" in third.stdout
        assert [m["epoch"] for m in metrics(out)] == [0, 1]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)


@pytest.mark.slow
def test_training_without_a_val_split_skips_validation_and_keeps_the_last_epoch(tmp_path: Path) -> None:

    shards = write_shards(tmp_path / "shards", {"train": [14, 14, 14, 14], "val": [], "test": [7]}, size=36)
    out = tmp_path / "run"
    done = run_train(out, shards)
    assert done.returncode == 0, done.stderr
    assert "has no val samples: validation is skipped and best.pt is the last epoch's weights" in done.stdout
    assert [m["epoch"] for m in metrics(out)] == [0, 1] and "val_balanced_accuracy" not in metrics(out)[0]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == 1 and best["metric"]["value"] is None
    assert (out / "eval" / "metrics.json").is_file()  # the test split is still evaluated


# _update_best decides best.pt; these cases pin it down without depending on what a CPU's floating point
# makes of a real validation (the tie that broke `make test` on one machine, issue 8 case 14).
@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


FACTS = ModelFacts(arch="resnet18", classes=CLASSES, image_size=32)


def _epochs(accelerator: Accelerator, out: Path, scores: list[float | None], state: TrainerState) -> int:
    model = resnet18(num_classes=7)
    for epoch, score in enumerate(scores, start=state.epoch):
        with torch.no_grad():
            model.fc.bias.fill_(epoch)  # marks which epoch's weights were exported
        _update_best(accelerator, model, state, FACTS, out, epoch, score)
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == state.best_epoch == int(best["model"]["fc.bias"][0])
    return best["epoch"]


@pytest.mark.parametrize(
    ("scores", "best_epoch"),
    [([0.4286, 0.4286], 0), ([0.5, 0.6, 0.6], 1), ([0.7, 0.6], 0), ([None, None, None], 2)],
)
def test_best_pt_follows_strict_improvement_and_a_tie_keeps_the_earlier_epoch(
    accelerator, tmp_path, scores, best_epoch
) -> None:
    assert _epochs(accelerator, tmp_path, scores, TrainerState()) == best_epoch


def test_a_run_branched_from_a_copied_checkpoint_writes_best_pt_even_on_a_tie(accelerator, tmp_path, capsys) -> None:
    # The resumed state says epoch 0 scored 0.4286, but its best.pt is in another folder.
    state = TrainerState(epoch=1, best_metric=0.4286, best_epoch=0)
    assert _epochs(accelerator, tmp_path, [0.4286], state) == 1
    assert "best.pt was missing" in capsys.readouterr().out


@pytest.mark.parametrize(
    "state",
    [{"epoch": "1; rm -rf /"}, {"epoch": -1}, {"step": 1.5}, {"best_metric": "0.9"}, {"evil": 1}, [1, 2]],
)
def test_a_hostile_trainer_state_is_refused_field_by_field(tmp_path: Path, state) -> None:
    from skinlesion.checkpoint import read_state

    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError):
        read_state(path)


def test_a_valid_trainer_state_round_trips(tmp_path: Path) -> None:
    from dataclasses import asdict

    from skinlesion.checkpoint import read_state

    state = TrainerState(epoch=2, step=14, best_metric=0.5, best_epoch=1, wandb_run_id="abc", arch="resnet18")
    (tmp_path / "s.json").write_text(json.dumps(asdict(state)))
    assert read_state(tmp_path / "s.json") == state


def test_a_binary_run_without_validation_auc_keeps_best_pt_by_the_lowest_loss(accelerator, tmp_path) -> None:
    """No melanoma in validation: AUC is undefined every epoch, and best.pt used to become the last epoch, silently."""
    import numpy as np

    from skinlesion.metrics import compute_metrics, selection

    probs = np.tile([0.8, 0.2], (20, 1))
    m = compute_metrics(np.zeros(20, int), probs, n_bootstrap=0, classes=("other", "mel"), malignant=("mel",))
    chosen = selection(m)
    assert (chosen["metric"], chosen["keeps"], chosen["value"]) == ("val_loss", "lowest", m["log_loss"])
    assert "val_auc is undefined: the validation split has 0 mel and 20 other images" in chosen["note"]
    model, state = resnet18(num_classes=2), TrainerState()
    for epoch, loss in enumerate([0.9, 0.5, 0.7]):
        with torch.no_grad():
            model.fc.bias.fill_(epoch)
        _update_best(accelerator, model, state, FACTS, tmp_path, epoch, loss, "val_loss")
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 1 == int(best["model"]["fc.bias"][0]) and best["metric"] == {
        "name": "val_loss",
        "value": 0.5,
    }
