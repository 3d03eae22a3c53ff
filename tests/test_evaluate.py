"""`skinlesion evaluate`: outputs and formats, and exactness across process counts."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port

from skinlesion.cli import main
from skinlesion.errors import UserError
from skinlesion.evaluate import _merge

OUTPUTS = (
    "metrics.json",
    "predictions.csv",
    "classification_report.txt",
    "confusion_matrix.png",
    "roc.png",
    "reliability.png",
)


@pytest.fixture(scope="module")
def checkpoint(random_run: Path) -> Path:
    """A random ResNet-18 model.pt with a config.yaml beside it (32-px crops), as training leaves it."""
    return random_run / "model.pt"


@pytest.fixture(scope="module")
def single(checkpoint: Path, shards_dir: Path) -> Path:
    """One-process evaluation of the test split, in the default output folder."""
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--shards", str(shards_dir)]) == 0
    return checkpoint.parent / "eval-test"


def test_writes_every_output_with_metrics_for_the_whole_split(single, checkpoint, shards_dir):
    assert all((single / name).is_file() and (single / name).stat().st_size > 0 for name in OUTPUTS)
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    expected = manifest["splits"]["test"]["samples"]
    metrics = json.loads((single / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(checkpoint) and metrics["split"] == "test"
    assert metrics["n_samples"] == expected
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (7, 7) and cm.sum() == expected
    counts = manifest["splits"]["test"]["class_counts"]
    assert cm.sum(axis=1).tolist() == [counts.get(dx, 0) for dx in metrics["classes"]]  # rows = true class
    low, high = metrics["balanced_accuracy_ci95"]
    assert low <= metrics["balanced_accuracy"] <= high
    assert set(metrics["per_class"]["mel"]) == {"precision", "recall", "f1", "support", "auc"}
    assert {"ece", "auc_macro", "accuracy", "melanoma"} <= set(metrics)
    assert "sensitivity_at_specificity_0.8" in metrics["melanoma"]
    assert "akiec" in (single / "classification_report.txt").read_text()


def test_predictions_csv_is_isic_2018_task3_format(single, shards_dir):
    rows = list(csv.reader((single / "predictions.csv").open()))
    assert rows[0] == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    body = rows[1:]
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    assert len(body) == manifest["splits"]["test"]["samples"]  # val/test hold each image once
    assert len({r[0] for r in body}) == len(body) and all(r[0].startswith("ISIC_") for r in body)
    for row in body:
        assert all("." in v for v in row[1:])  # floats with a decimal point, never "1" or "1e-05"
        assert sum(float(v) for v in row[1:]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_two_processes_give_the_same_results_as_one(single, checkpoint, shards_dir, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on CPU: same confusion matrix, same predictions.csv."""
    port = free_port()
    out = tmp_path / "two"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        "skinlesion",
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--shards",
        str(shards_dir),
        "--out",
        str(out),
    ]
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "balanced accuracy" in result.stdout and result.stdout.count("balanced accuracy") == 1  # main only
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, out))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert two["n_samples"] == one["n_samples"]
    a, b = ((d / "predictions.csv").read_text().splitlines() for d in (single, out))
    assert [r.split(",")[0] for r in a] == [r.split(",")[0] for r in b]
    np.testing.assert_allclose(
        [[float(v) for v in r.split(",")[1:]] for r in a[1:]],
        [[float(v) for v in r.split(",")[1:]] for r in b[1:]],
        atol=1e-5,
    )


def test_a_sample_seen_twice_or_missing_is_an_error():
    part = {
        "keys": ["a", "b"],
        "image_ids": ["a", "b"],
        "lesion_ids": [None, None],
        "labels": np.array([0, 1]),
        "probs": np.full((2, 7), 1 / 7),
    }
    assert _merge([part], 2, "m.json", "test").keys == ["a", "b"]
    with pytest.raises(UserError, match="duplicate"):
        _merge([part, part], 4, "m.json", "test")  # e.g. padding by a distributed sampler
    with pytest.raises(UserError, match="lists 3"):
        _merge([part], 3, "m.json", "test")  # e.g. a dropped remainder


def test_unknown_split_and_missing_shards_are_clear_errors(checkpoint, shards_dir, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--shards", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--shards", str(shards_dir)]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_the_result_gives_wandb_scalars_and_metrics_jsonl_columns(single):
    from skinlesion.evaluate import EvalResult

    metrics = json.loads((single / "metrics.json").read_text())
    result = EvalResult(metrics=metrics, predictions=None, files={})
    assert result.record("val")["val_balanced_accuracy"] == metrics["balanced_accuracy"]
    assert result.record("val")["val_samples"] == metrics["n_samples"]
    assert "at specificity 0.9" in result.summary() and "balanced accuracy" in result.summary()
    scalars = result.scalars("val")
    assert scalars["val/mel_sensitivity_at_spec_0.9"] == metrics["melanoma"]["sensitivity_at_specificity_0.9"]
    assert scalars["val/balanced_accuracy"] == metrics["balanced_accuracy"]
    assert scalars["val/recall/mel"] == metrics["per_class"]["mel"]["recall"]
    assert all(isinstance(v, float) for v in scalars.values())


def test_evaluate_refuses_to_write_into_a_run_folder_that_a_training_holds(random_run, shards_dir, tmp_path, capsys):
    """Issue 16, point 10: `evaluate --split val` on a running training's best.pt wrote model_card.json and
    ood.pt beside it, and its default --out is eval-val, which the trainer rewrites every epoch."""
    from skinlesion.files import FolderLock

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes((random_run / "best.pt").read_bytes())
    base = ["evaluate", "--checkpoint", str(run / "best.pt"), "--shards", str(shards_dir)]
    refused = (
        ["--split", "val"],  # the card beside best.pt, and --out run/eval-val
        ["--split", "val", "--out", str(tmp_path / "elsewhere")],  # the card alone
        ["--split", "test", "--out", str(run / "eval-val")],  # a folder inside the run
    )
    with FolderLock(run, "train.output_dir"):  # what the trainer holds while it runs
        for extra in refused:
            assert main([*base, *extra]) == 2
            err = capsys.readouterr().err
            assert f"{run} is in use by host" in err and err.count("\n") == 1
        assert sorted(p.name for p in run.iterdir()) == [".lock", "best.pt"]
    assert main([*base, "--split", "test", "--out", str(run / "eval-test")]) == 0  # the training has finished
    assert (run / "eval-test" / "metrics.json").is_file()


def test_evaluate_val_keeps_an_earlier_cards_test_figures_only_for_the_same_weights(random_run, shards_dir, tmp_path):
    """The test figures of a card for other weights (same file name: a newer best.pt) no longer carry over."""
    import torch

    from skinlesion.checkpoint import export_best
    from skinlesion.facts import ModelFacts

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes((random_run / "best.pt").read_bytes())
    command = ["evaluate", "--checkpoint", str(run / "best.pt"), "--shards", str(shards_dir), "--split", "val"]
    test = {"n_samples": 56, "balanced_accuracy": 0.5, "balanced_accuracy_ci95": [0.4, 0.6], "ece": 0.1}
    assert main(command) == 0
    card = json.loads((run / "model_card.json").read_text())
    (run / "model_card.json").write_text(json.dumps(card | {"test": test}))  # as training's finish writes it
    assert main(command) == 0
    assert json.loads((run / "model_card.json").read_text())["test"] == test
    raw = torch.load(run / "best.pt", weights_only=True)
    raw["model"]["fc.bias"] += 0.01  # a later epoch's weights under the same name
    facts = ModelFacts(arch=raw["arch"], classes=tuple(raw["classes"]), image_size=raw["image_size"])
    export_best(raw["model"], run / "best.pt", facts=facts, epoch=2, step=20, metric=raw["metric"])
    assert main(command) == 0
    assert json.loads((run / "model_card.json").read_text())["test"] is None
