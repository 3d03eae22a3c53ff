"""The long-tail losses against values computed by hand, and the priors prepare records for them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import metrics, run_train, tiny_shards

from skinlesion.config import load_config
from skinlesion.errors import UserError
from skinlesion.labels import CLASSES
from skinlesion.losses import make_criterion

LOGITS = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0]])
TARGET = torch.tensor([0, 5])
COUNTS = dict(zip(CLASSES, [10, 20, 40, 5, 40, 200, 5], strict=True))
MANIFEST = {"splits": {"train": {"class_counts": {dx: 50 for dx in CLASSES}, "class_counts_before_balancing": COUNTS}}}


def _loss(*overrides: str, manifest: dict = MANIFEST) -> float:
    cfg = load_config(None, ["train.label_smoothing=0", *overrides])
    return float(make_criterion(cfg.train, manifest)(LOGITS, TARGET))


def _log_softmax(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def test_ce_is_plain_cross_entropy() -> None:
    a, b = _log_softmax(LOGITS[0].tolist()), _log_softmax(LOGITS[1].tolist())
    assert _loss("train.loss=ce") == pytest.approx(-(a[0] + b[5]) / 2, rel=1e-6)


def test_weighted_ce_weighs_by_inverse_frequency() -> None:
    counts = dict(COUNTS)
    manifest = {"splits": {"train": {"class_counts": counts}}}
    n, k = sum(counts.values()), len(CLASSES)
    w = {dx: n / (k * c) for dx, c in counts.items()}
    a, b = _log_softmax(LOGITS[0].tolist()), _log_softmax(LOGITS[1].tolist())
    expected = -(w["akiec"] * a[0] + w["nv"] * b[5]) / (w["akiec"] + w["nv"])  # torch's weighted mean
    assert _loss("train.loss=weighted_ce", manifest=manifest) == pytest.approx(expected, rel=1e-6)


def test_logit_adjusted_adds_tau_log_prior_from_the_counts_before_balancing() -> None:
    total = sum(COUNTS.values())
    shift = [0.5 * math.log(COUNTS[dx] / total) for dx in CLASSES]
    a = _log_softmax([v + s for v, s in zip(LOGITS[0].tolist(), shift, strict=True)])
    b = _log_softmax([v + s for v, s in zip(LOGITS[1].tolist(), shift, strict=True)])
    assert _loss("train.loss=logit_adjusted", "train.loss_tau=0.5") == pytest.approx(-(a[0] + b[5]) / 2, rel=1e-6)


def test_focal_down_weights_easy_examples() -> None:
    a, b = _log_softmax(LOGITS[0].tolist()), _log_softmax(LOGITS[1].tolist())
    gamma = 2.0
    expected = -((1 - math.exp(a[0])) ** gamma * a[0] + (1 - math.exp(b[5])) ** gamma * b[5]) / 2
    assert _loss("train.loss=focal", f"train.focal_gamma={gamma}") == pytest.approx(expected, rel=1e-6)
    assert _loss("train.loss=focal", "train.focal_gamma=0") == pytest.approx(_loss("train.loss=ce"), rel=1e-6)


def test_label_smoothing_is_honoured_by_every_loss() -> None:
    for loss in ("ce", "weighted_ce", "logit_adjusted", "focal"):
        assert _loss(f"train.loss={loss}", "train.label_smoothing=0.2") != _loss(f"train.loss={loss}")


def test_weighted_ce_without_a_class_is_a_clear_error() -> None:
    manifest = {"splits": {"train": {"class_counts": dict(COUNTS, df=0)}}}
    with pytest.raises(UserError, match="train split has no df samples"):
        _loss("train.loss=weighted_ce", manifest=manifest)


def test_prepare_records_the_class_counts_before_balancing(shards_dir: Path) -> None:
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    train, splits = manifest["splits"]["train"], manifest["splits"]
    assert set(train["class_counts"].values()) == {40}  # balanced to 40 per class
    before = train["class_counts_before_balancing"]
    held_out = splits["val"]["samples"] + splits["test"]["samples"]
    assert set(before) == set(CLASSES) and before["nv"] > 4 * before["df"]
    assert sum(before.values()) == manifest["rows"]["kept"] - held_out  # every kept train row, once


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["weighted_ce", "logit_adjusted", "focal"])
def test_training_runs_with_each_loss(tmp_path: Path, loss: str) -> None:

    shards = tiny_shards(tmp_path / "shards")
    done = run_train(tmp_path / "run", shards, f"train.loss={loss}", "train.epochs=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert math.isfinite(metrics(tmp_path / "run")[0]["train_loss"])
