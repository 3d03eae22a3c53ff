"""Subgroup metrics (sex, age band, site, dx_type) with counts and bootstrap CIs; too-small subgroups say so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from skinlesion.labels import CLASSES
from skinlesion.metrics import bootstrap_auc
from skinlesion.subgroups import MIN_POSITIVES, age_band, limitation_lines, subgroup_metrics

MEL = CLASSES.index("mel")


def test_age_bands_follow_the_issue() -> None:
    assert [age_band(a) for a in (0, 29.9, 30, 49, 50, 69, 70, 85)] == [
        "<30",
        "<30",
        "30-50",
        "30-50",
        "50-70",
        "50-70",
        ">=70",
        ">=70",
    ]
    assert age_band(None) is None and age_band("") is None and age_band(float("nan")) is None


def _data() -> tuple[np.ndarray, np.ndarray, list[dict], np.ndarray]:
    """40 melanomas on the back (30 found), 14 on acral sites (5 found), 4 on the face; nevi elsewhere."""
    rng = np.random.default_rng(0)
    sites = ["back"] * 40 + ["acral"] * 14 + ["face"] * 4 + ["back"] * 60 + ["acral"] * 30
    y = np.array([MEL] * 58 + [CLASSES.index("nv")] * 90)
    found = np.array([True] * 30 + [False] * 10 + [True] * 5 + [False] * 9 + [True] * 4 + [True] * 90)
    pred = np.where(found, y, np.where(y == MEL, CLASSES.index("nv"), MEL))
    probs = np.full((y.size, 7), 0.02)
    probs[np.arange(y.size), pred] = 0.88 - rng.uniform(0, 0.1, y.size)
    probs /= probs.sum(1, keepdims=True)
    metas = [{"localization": s, "sex": "male" if i % 2 else "female", "age": 20 + i % 60} for i, s in enumerate(sites)]
    return y, probs, metas, np.arange(y.size) // 2  # two images per lesion


def test_subgroups_report_sensitivity_auc_counts_and_cis_and_call_small_ones_too_small() -> None:
    y, probs, metas, lesions = _data()
    sub = subgroup_metrics(y, probs, metas, CLASSES, groups=lesions, n_bootstrap=300)
    assert set(sub) == {"sex", "age_band", "site"}  # no dx_type in these metas: no such subgroups
    acral = sub["site"]["acral"]["positive"]
    assert acral["n"] == 14 and acral["sensitivity"] == pytest.approx(5 / 14)
    low, high = acral["sensitivity_ci95"]
    assert low < 5 / 14 < high
    rows = np.array([m["localization"] == "acral" for m in metas])
    assert acral["auc"] == pytest.approx(roc_auc_score(y[rows] == MEL, probs[rows, MEL]))
    assert sub["site"]["back"]["positive"]["sensitivity"] == pytest.approx(30 / 40)
    face = sub["site"]["face"]["positive"]
    assert face == {
        "too_small": True,
        "n": 4,
        "note": f"fewer than {MIN_POSITIVES} mel images (n=4): too small to report",
        "class": "mel",
    }
    assert sub["site"]["acral"]["per_class_recall"]["nv"] == {"recall": 1.0, "n": 30}
    assert sub["site"]["acral"]["per_class_recall"]["df"]["too_small"]
    assert sub["site"]["acral"]["n"] == 44
    json.dumps(sub)  # JSON-ready

    lines = limitation_lines(sub, "test")
    assert any(line.startswith("melanoma sensitivity on acral sites (test): 0.36 (n=14, 95% CI ") for line in lines)
    shown = [float(line.split(": ")[1].split(" ")[0]) for line in lines[:-1]]
    assert shown == sorted(shown)  # weakest first
    assert lines[-1].startswith("Too few melanomas to report a sensitivity (test): ")
    assert "on face sites (n=4)" in lines[-1] and "acral" not in lines[-1]


def test_bootstrap_auc_is_roc_auc_of_the_resampled_groups() -> None:
    rng = np.random.default_rng(2)
    positive = rng.uniform(size=90) < 0.3
    scores = np.round(rng.normal(size=90) + positive, 1)  # ties included
    groups = np.repeat(np.arange(30), 3)
    low, high = bootstrap_auc(positive, scores, groups, n_resamples=1, seed=7)
    drawn = np.random.default_rng(7).integers(0, 30, size=(1, 30))[0]
    rows = np.concatenate([np.flatnonzero(groups == g) for g in drawn])
    assert low == high == pytest.approx(roc_auc_score(positive[rows], scores[rows]), abs=1e-12)


def test_the_model_card_lists_subgroup_limitations(tmp_path: Path, shards_dir: Path, random_run: Path) -> None:
    import torch

    from skinlesion.card import calibrate
    from skinlesion.model import load_for_inference

    best = tmp_path / "best.pt"
    best.write_bytes((random_run / "best.pt").read_bytes())
    loaded = load_for_inference(best)
    with torch.no_grad():
        card = calibrate(loaded.model, best, shards_dir, loaded.image_size, loaded.arch)
    assert card["subgroups"]["split"] == "validation" and "site" in card["subgroups"]["metrics"]
    assert any("Too few melanomas to report" in line or "melanoma sensitivity" in line for line in card["limitations"])
