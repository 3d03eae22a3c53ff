"""Training end to end on tiny colour-coded shards: outputs per the contract, loss falls, clear failures.

Runs go through `python -m skinlesion train` in a subprocess, as a user would run them (tests/helpers.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import metrics, run_train, tiny_shards
from torchvision.models import resnet18

from skinlesion.epoch import epoch_line
from skinlesion.model import load_for_inference


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny shards whose manifest, as prepare's does, records the JPEG quality of its images (PIL's default, 75)."""
    out = tiny_shards(tmp_path_factory.mktemp("tiny") / "shards")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest | {"jpeg_quality": 75}))
    return out


@pytest.mark.slow
def test_training_writes_the_contract_outputs_and_the_loss_falls(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_train(out, shards, "train.epochs=3")
    assert done.returncode == 0, done.stderr
    lines = metrics(out)
    assert [m["epoch"] for m in lines] == [0, 1, 2]
    # one line per epoch on the console: losses, the metric that chose best.pt, images/s, wall time
    printed = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split("  ")[0] for line in printed] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    for line, m in zip(printed, lines, strict=True):
        assert f"  loss {m['train_loss']:.3f}  val loss {m['val_loss']:.3f}  " in line
        assert f"  val balanced_accuracy {m['val_balanced_accuracy']:.3f}  " in line
        assert re.search(r"  [\d,]+ images/s  \d+\.\d s(  -> best\.pt)?$", line), line
    scores = [m["val_balanced_accuracy"] for m in lines]  # best.pt is rewritten on every strict improvement
    improved = [i == 0 or score > max(scores[:i]) for i, score in enumerate(scores)]
    assert [line.endswith("  -> best.pt") for line in printed] == improved
    assert {
        "step",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_balanced_accuracy",
        "lr",
        "images_per_second",
    } <= set(lines[0])
    assert lines[-1]["train_loss"] < 0.8 * lines[0]["train_loss"]
    assert lines[-1]["val_samples"] == 14  # every val sample scored once
    assert all(m["skipped_samples"] == 0 for m in lines)

    model = resnet18(num_classes=7)  # the seed's way of loading model.pt
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["arch"] == "resnet18" and best["image_size"] == 32 and best["metric"]["name"] == "val_balanced_accuracy"
    assert best["metric"]["value"] == max(m["val_balanced_accuracy"] for m in lines)
    assert f"best.pt (epoch {best['epoch'] + 1}/3)" in done.stdout  # counted from 1 on the console, 0 in files
    assert load_for_inference(out / "best.pt").arch == "resnet18"
    # How the shards were made travels with both files, for predict to repeat (tests/test_preprocess_parity.py).
    assert (best["shard_size"], best["jpeg_quality"]) == (36, 75)
    loaded = load_for_inference(out / "model.pt")
    assert (loaded.image_size, loaded.shard_size, loaded.jpeg_quality) == (32, 36, 75)

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["image_size"] == 32 and config["runtime"]["world_size"] == 1
    assert set(config["runtime"]["versions"]) >= {"torch", "torchvision", "accelerate", "webdataset"}
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints in smoke.yaml
    assert not list((out / "checkpoints").glob(".tmp*"))


@pytest.mark.slow
def test_a_diverging_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_train(out, shards, "train.lr=1e30", "train.grad_clip=0", "train.checkpoint_every_steps=1")
    assert done.returncode == 2
    assert "error: the loss became" in done.stderr and "Last good checkpoint" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (out / "model.pt").exists()
    assert list((out / "checkpoints").glob("step-*/COMPLETE"))


def test_the_epoch_line_names_the_metric_that_chooses_best_pt() -> None:
    stats = {"train_loss": 0.41234, "images_per_second": 1230.4}
    line = epoch_line(2, 4, stats, 12.44, (0.3849, "val_balanced_accuracy", 0.9101), best=True)
    expected = "epoch 3/4  loss 0.412  val loss 0.385  val balanced_accuracy 0.910  1,230 images/s  12.4 s  -> best.pt"
    assert line == expected
    binary = epoch_line(0, 1, stats, 1.0, (0.5, "val_auc", None), best=False)  # AUC undefined: one class in val
    assert "  val auc n/a  " in binary and not binary.endswith("best.pt")
    assert epoch_line(0, 1, stats, 1.0, None, best=True) == "epoch 1/1  loss 0.412  1,230 images/s  1.0 s  -> best.pt"


def test_more_loader_workers_than_cores_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """data.num_workers=100000 used to fork until memory ran out (the DataLoader only warns)."""
    done = run_train(tmp_path / "run", tmp_path, "data.num_workers=100000")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: data.num_workers=100000 is more than the ")
    assert "core(s) this process may use" in errors[0] and "data.num_workers=auto" in errors[0]
    assert not (tmp_path / "run").exists()


def test_missing_shards_and_bad_keys_are_clear_errors(tmp_path: Path) -> None:
    done = run_train(tmp_path / "run", tmp_path / "no-shards")
    assert done.returncode == 2 and "error: data.shards=" in done.stderr and "skinlesion prepare" in done.stderr
    done = run_train(tmp_path / "run", tmp_path, "train.epochz=3")
    assert done.returncode == 2 and "did you mean 'train.epochs'?" in done.stderr
    assert "Traceback" not in done.stderr
