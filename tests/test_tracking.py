"""The W&B helpers on their own: which mistakes are chosen, ROC curves from the right columns, shard bytes by
key, a failing W&B that only warns, and no wandb import at all when W&B is off. No training here."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from skinlesion import tracking, tracking_eval
from skinlesion.labels import CLASSES

REPO = Path(__file__).resolve().parents[1]


def _probs(rows: list[tuple[int, float]], n_classes: int = len(CLASSES)) -> np.ndarray:
    """One row per (argmax class, its probability); the rest spread evenly."""
    out = np.zeros((len(rows), n_classes))
    for i, (top, p) in enumerate(rows):
        out[i] = (1 - p) / (n_classes - 1)
        out[i, top] = p
    return out


def test_most_confident_mistakes_are_the_wrong_ones_by_confidence_capped_at_k() -> None:
    labels = np.array([0, 1, 2, 3, 4, 5])
    probs = _probs([(0, 0.9), (2, 0.6), (3, 0.8), (3, 0.95), (1, 0.6), (0, 0.7)])  # 0 and 3 are right
    assert tracking_eval.most_confident_mistakes(labels, probs).tolist() == [2, 5, 1, 4]  # 0.6 tie: key order
    assert tracking_eval.most_confident_mistakes(labels, probs, k=2).tolist() == [2, 5]
    assert tracking_eval.most_confident_mistakes(labels[[0, 3]], probs[[0, 3]]).tolist() == []

    rng = np.random.default_rng(0)
    many = rng.dirichlet(np.ones(7), size=500)
    chosen = tracking_eval.most_confident_mistakes(np.zeros(500, dtype=int), many)
    confidence = many.max(axis=1)
    wrong = many.argmax(axis=1) != 0
    assert len(chosen) == 32 and wrong[chosen].all()
    assert confidence[chosen].min() >= confidence[wrong & ~np.isin(np.arange(500), chosen)].max()


def test_roc_chart_reads_each_class_from_its_own_column_when_a_class_is_missing() -> None:
    """wandb.plot.roc_curve indexes y_probas by rank among the classes present; with class 1 absent it would
    draw bcc's column as bkl's. Each present class here is separated perfectly by its own column only."""
    from skinlesion.evaluate import Predictions

    labels = np.array([0, 0, 2, 2, 4, 4, 6, 6])
    probs = np.full((8, 7), 0.01)
    probs[np.arange(8), labels] = 0.9
    probs[:, 1] = np.linspace(0.5, 0.0, 8)  # the absent class's column: a curve from it would not be perfect
    preds = Predictions(
        keys=[f"k{i}" for i in range(8)],
        image_ids=[f"i{i}" for i in range(8)],
        lesion_ids=[None] * 8,
        labels=labels,
        probs=probs,
    )
    charts = tracking_eval.charts(preds, "val_best")
    assert set(charts) == {"val_best/confusion_matrix_chart", "val_best/roc_chart"}
    curves: dict[str, list[tuple[float, float]]] = {}
    for name, fpr, tpr in charts["val_best/roc_chart"].table.data:
        curves.setdefault(name, []).append((fpr, tpr))
    assert set(curves) == {"akiec", "bkl", "mel", "vasc"}
    assert all((0.0, 1.0) in points for points in curves.values())  # perfect: each from its own column
    cm = {(a, p): n for a, p, n in charts["val_best/confusion_matrix_chart"].table.data}
    assert cm["bkl", "bkl"] == 2 and sum(cm.values()) == 8


def test_read_jpegs_returns_the_shard_bytes_of_the_asked_keys_only(tmp_path: Path) -> None:
    from test_pipeline import write_shards

    shards = write_shards(tmp_path / "shards", {"val": [5, 5]})
    got = tracking_eval.read_jpegs(shards, "val", {"val_000001", "val_000008", "no-such-key"})
    assert sorted(got) == ["val_000001", "val_000008"]
    with tarfile.open(shards / "val-000001.tar") as tar:
        assert got["val_000008"] == tar.extractfile("val_000008.jpg").read()
    assert tracking_eval.read_jpegs(shards, "val", set()) == {}


class _FailingRun:
    id, offline, dir = "abc123", True, "/nonexistent"

    def log_artifact(self, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    _log_artifact = log_artifact


def _accelerator(run: object | None, main: bool = True) -> SimpleNamespace:
    trackers = [] if run is None else [SimpleNamespace(name="wandb", run=run)]
    return SimpleNamespace(is_main_process=main, trackers=trackers, log=lambda *a, **k: None)


def test_a_failing_wandb_warns_and_the_training_carries_on(
    random_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_pipeline import write_shards

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb"))  # W&B stages a copy before it fails
    shards = write_shards(tmp_path / "shards", {"val": [7]})
    tracking.log_model(_accelerator(_FailingRun()), random_run)
    tracking.log_dataset(_accelerator(_FailingRun()), shards)
    err = capsys.readouterr().err
    assert f"warning: W&B: logging {random_run}/best.pt as a model artifact failed (OSError" in err
    assert f"warning: W&B: logging {shards}/manifest.json as a dataset artifact failed (OSError" in err


def test_only_the_main_process_with_a_wandb_tracker_logs() -> None:
    assert tracking.wandb_run(_accelerator(_FailingRun(), main=False)) is None
    assert tracking.wandb_run(_accelerator(None)) is None
    run = _FailingRun()
    assert tracking.wandb_run(_accelerator(run)) is run


def test_without_a_wandb_tracker_nothing_imports_wandb(tmp_path: Path) -> None:
    """wandb.mode=disabled means no tracker: every helper returns before touching wandb or the shards."""
    code = f"""
import sys
from pathlib import Path
from types import SimpleNamespace
from skinlesion import tracking, tracking_eval, train  # train imports both
acc = SimpleNamespace(is_main_process=True, trackers=[])
missing = Path({str(tmp_path / "missing")!r})
tracking.log_dataset(acc, missing)
tracking.log_model(acc, missing)
tracking_eval.log_val_best(acc, None, missing, 0, 0)
tracking_eval.log_test_charts(acc, None)
assert "wandb" not in sys.modules, "wandb was imported"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
