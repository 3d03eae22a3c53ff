"""Metrics against values worked out by hand, and the official ISIC scorer where it is installed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from skinlesion.labels import CLASSES
from skinlesion.metrics import (
    bootstrap_balanced_accuracy,
    compute_metrics,
    confusion_matrix,
    expected_calibration_error,
)

AKIEC, BCC, BKL, DF, MEL, NV, VASC = range(7)


def _probs_for(pred: list[int], confidence: float = 0.9) -> np.ndarray:
    """Rows with `confidence` on the predicted class and the rest spread evenly over the other six."""
    probs = np.full((len(pred), 7), (1 - confidence) / 6)
    probs[np.arange(len(pred)), pred] = confidence
    return probs


# A fixed confusion matrix (no dermatofibroma in the truth), as (true, predicted, count):
#   akiec 3 right + 1 as bcc; bcc 2 right; bkl 1 right + 1 as nv; mel 4 right + 1 as nv;
#   nv 9 right + 1 as mel; vasc 1 right.  24 samples, 20 right.
FIXED = [
    (AKIEC, AKIEC, 3),
    (AKIEC, BCC, 1),
    (BCC, BCC, 2),
    (BKL, BKL, 1),
    (BKL, NV, 1),
    (MEL, MEL, 4),
    (MEL, NV, 1),
    (NV, NV, 9),
    (NV, MEL, 1),
    (VASC, VASC, 1),
]


@pytest.fixture
def fixed() -> tuple[np.ndarray, np.ndarray]:
    y_true = np.array([t for t, _, n in FIXED for _ in range(n)])
    y_pred = [p for _, p, n in FIXED for _ in range(n)]
    return y_true, _probs_for(y_pred)


def test_confusion_matrix_rows_are_true_class_in_alphabetical_order(fixed):
    y_true, probs = fixed
    cm = np.array(compute_metrics(y_true, probs, n_bootstrap=0)["confusion_matrix"])
    assert cm.shape == (7, 7) and cm.sum() == 24
    assert cm[AKIEC, BCC] == 1 and cm[BCC, AKIEC] == 0  # rows true, columns predicted
    assert cm[MEL, NV] == 1 and cm[NV, MEL] == 1 and cm[NV, NV] == 9
    assert cm[DF].sum() == 0


def test_balanced_accuracy_accuracy_and_per_class_by_hand(fixed):
    y_true, probs = fixed
    m = compute_metrics(y_true, probs, n_bootstrap=0)
    assert m["n_samples"] == 24
    assert m["accuracy"] == pytest.approx(20 / 24)
    # Mean recall over the 6 classes present: (3/4 + 1 + 1/2 + 4/5 + 9/10 + 1) / 6 = 0.825
    assert m["balanced_accuracy"] == pytest.approx(0.825)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, probs.argmax(1)))
    mel, nv, df = m["per_class"]["mel"], m["per_class"]["nv"], m["per_class"]["df"]
    assert (mel["precision"], mel["recall"], mel["f1"], mel["support"]) == pytest.approx((4 / 5, 4 / 5, 4 / 5, 5))
    assert nv["precision"] == pytest.approx(9 / 11) and nv["recall"] == pytest.approx(9 / 10)
    assert nv["f1"] == pytest.approx(2 * (9 / 11) * (9 / 10) / (9 / 11 + 9 / 10))
    assert df == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0, "auc": None}  # absent: no AUC
    json.dumps(m, allow_nan=False)  # NaN never reaches metrics.json


def _melanoma_scores() -> tuple[np.ndarray, np.ndarray]:
    """4 melanomas and 10 nevi; p(mel) chosen so that AUC and operating points can be counted by hand."""
    mel = [0.9, 0.8, 0.4, 0.3]
    nv = [0.85, 0.35, 0.25, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001]
    y_true = np.array([MEL] * 4 + [NV] * 10)
    probs = np.zeros((14, 7))
    probs[:, MEL] = mel + nv
    probs[:, NV] = 1 - probs[:, MEL]
    return y_true, probs


def test_auc_and_melanoma_sensitivity_at_specificity_by_hand():
    y_true, probs = _melanoma_scores()
    m = compute_metrics(y_true, probs, n_bootstrap=0)
    # Pairs (melanoma, nevus) ranked correctly: 10 + 9 + 9 + 8 = 36 of 40.
    assert m["per_class"]["mel"]["auc"] == pytest.approx(0.9)
    assert m["per_class"]["nv"]["auc"] == pytest.approx(0.9)
    assert m["per_class"]["bcc"]["auc"] is None
    assert m["auc_macro"] == pytest.approx(0.9)  # mean over the classes present only
    mel = m["melanoma"]
    # Specificity >= 0.9 allows 1 false positive of 10 (0.85): threshold 0.4 catches 0.9, 0.8, 0.4 -> 3/4.
    assert mel["sensitivity_at_specificity_0.9"] == pytest.approx(0.75)
    assert mel["threshold_at_specificity_0.9"] == pytest.approx(0.4)
    # Specificity >= 0.8 allows 2 (0.85, 0.35): threshold 0.3 catches all four melanomas.
    assert mel["sensitivity_at_specificity_0.8"] == pytest.approx(1.0)
    assert mel["threshold_at_specificity_0.8"] == pytest.approx(0.3)
    assert mel["sensitivity_at_argmax"] == pytest.approx(0.5)  # p(mel) > 0.5 for 0.9 and 0.8 only


def test_melanoma_metrics_are_null_without_melanoma():
    y_true = np.array([NV, NV, BKL])
    m = compute_metrics(y_true, _probs_for([NV, BKL, BKL]), n_bootstrap=0)
    assert m["melanoma"]["sensitivity_at_specificity_0.8"] is None
    assert m["melanoma"]["auc"] is None


def test_ece_by_hand():
    # Two samples at confidence 0.9 (one right), two at 0.62 (both right), 15 bins:
    # 0.5 * |0.5 - 0.9| + 0.5 * |1.0 - 0.62| = 0.2 + 0.19
    probs = _probs_for([MEL, MEL, NV, NV], confidence=0.9)
    probs[2:] = _probs_for([NV, NV], confidence=0.62)
    y_true = np.array([MEL, NV, NV, NV])
    assert expected_calibration_error(y_true, probs) == pytest.approx(0.39)
    assert compute_metrics(y_true, probs, n_bootstrap=0)["ece"] == pytest.approx(0.39)


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate(fixed):
    y_true, probs = fixed
    y_pred = probs.argmax(1)
    a = bootstrap_balanced_accuracy(y_true, y_pred, n_resamples=500, seed=3)
    assert a == bootstrap_balanced_accuracy(y_true, y_pred, n_resamples=500, seed=3)
    assert a != bootstrap_balanced_accuracy(y_true, y_pred, n_resamples=500, seed=4)
    assert 0.5 < a[0] < 0.825 < a[1] <= 1.0
    m = compute_metrics(y_true, probs, n_bootstrap=200)
    assert m["balanced_accuracy_ci95"][0] <= m["balanced_accuracy"] <= m["balanced_accuracy_ci95"][1]


def test_bootstrap_matches_explicit_resampling_and_resamples_whole_lesions():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 7, 60)
    y_pred = np.where(rng.random(60) < 0.7, y_true, rng.integers(0, 7, 60))
    # The vectorised bootstrap equals computing balanced accuracy on each explicit resample.
    draws = np.random.default_rng(11).integers(0, 60, size=(300, 60))
    explicit = [balanced_accuracy_score(y_true[d], y_pred[d]) for d in draws]
    expected = np.percentile(explicit, [2.5, 97.5])
    assert bootstrap_balanced_accuracy(y_true, y_pred, n_resamples=300, seed=11) == pytest.approx(tuple(expected))
    # One lesion holding every image: every resample is the full set, so the interval would have zero width:
    # it is not estimable (NaN; metrics.json writes null and says why), never "point-point".
    low, high = bootstrap_balanced_accuracy(y_true, y_pred, groups=np.array(["L1"] * 60), n_resamples=50)
    assert np.isnan(low) and np.isnan(high)


def test_confusion_matrix_helper_counts_pairs():
    cm = confusion_matrix(np.array([0, 0, 6]), np.array([0, 6, 6]))
    assert cm[0, 0] == 1 and cm[0, 6] == 1 and cm[6, 6] == 1 and cm.sum() == 3


@pytest.mark.filterwarnings("ignore")  # the scorer's own pandas deprecation warnings
def test_agrees_with_the_official_isic_scorer(monkeypatch, tmp_path):
    """Our balanced accuracy and per-class AUC equal isic-challenge-scoring's on the predictions.csv that
    evaluate writes, with OOD scores: issue 21, point 16, the scorer refused the file for its OOD columns
    ("Extra columns in CSV"), which this test missed while its predictions had no OOD scores."""
    pytest.importorskip("isic_challenge_scoring")
    import pandas as pd
    from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

    from skinlesion.eval_outputs import write_outputs
    from skinlesion.evaluate import Predictions

    if not hasattr(pd.DataFrame, "applymap"):  # the scorer (5.6) still calls applymap, removed in pandas 3
        monkeypatch.setattr(pd.DataFrame, "applymap", pd.DataFrame.map, raising=False)
    rng = np.random.default_rng(1)
    n = 80
    y_true = np.concatenate([np.arange(7), rng.integers(0, 7, n - 7)])
    logits = rng.normal(size=(n, 7)) + 2.0 * np.eye(7)[y_true]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    ood = np.where(np.arange(n) % 4 == 0, 3.0, 0.5)  # every fourth image far above the threshold of 1
    preds = Predictions(keys=ids, image_ids=ids, lesion_ids=[None] * n, labels=y_true, probs=probs, ood_scores=ood)
    truth = pd.DataFrame(np.eye(7)[y_true], columns=[dx.upper() for dx in CLASSES])
    truth.insert(0, "image", ids)
    (tmp_path / "truth.csv").write_text(
        truth[["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]].to_csv(index=False)
    )
    ours = compute_metrics(y_true, probs, n_bootstrap=0)
    files = write_outputs(tmp_path / "eval", preds, ours, plots=False)

    score = ClassificationScore.from_file(
        tmp_path / "truth.csv", files["predictions"], ClassificationMetric.BALANCED_ACCURACY
    )
    assert files["predictions"].read_text().splitlines()[0] == "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"
    assert ours["balanced_accuracy"] == pytest.approx(score.aggregate["balanced_accuracy"], abs=1e-12)
    for dx in CLASSES:
        assert ours["per_class"][dx]["auc"] == pytest.approx(score.per_category.loc[dx.upper(), "auc"], abs=1e-12)
    beside = pd.read_csv(files["ood"])  # the OOD scores, beside the submission and keyed like it
    assert list(beside.columns) == ["image", "ood_score", "ood_flag"] and list(beside["image"]) == ids
    assert list(beside["ood_score"]) == list(ood) and list(beside["ood_flag"]) == [int(s > 1) for s in ood]
    plain = Predictions(keys=ids, image_ids=ids, lesion_ids=[None] * n, labels=y_true, probs=probs)
    assert "ood" not in write_outputs(tmp_path / "eval", plain, ours, plots=False)
    assert not (tmp_path / "eval" / "ood.csv").exists()  # no stale scores left beside other predictions


def _melanoma_nevus(n_mel: int = 12, n_nev: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """A custom spec's two classes in its own order, melanoma first: each melanoma found (p = 0.7), and 10 of the
    nevi called melanoma (p = 0.6), so the melanoma and nevus numbers differ."""
    y = np.array([0] * n_mel + [1] * n_nev)
    p_mel = np.where(y == 0, 0.7, 0.2)
    p_mel[n_mel : n_mel + 10] = 0.6
    return y, np.stack([p_mel, 1 - p_mel], axis=1)


def test_binary_metrics_score_the_malignant_class_whatever_the_order_of_the_classes() -> None:
    y, probs = _melanoma_nevus()
    m = compute_metrics(y, probs, n_bootstrap=0, classes=("melanoma", "nevus"), malignant=("melanoma",))
    b = m["binary"]
    assert (b["positive"], b["positives"], b["negatives"]) == ("melanoma", 12, 30)  # was nevus, 30 and 12
    assert b["sensitivity_at_specificity_0.9"] is None or b["sensitivity_at_specificity_0.9"] <= 1.0
    assert b["auc"] == pytest.approx(m["per_class"]["melanoma"]["auc"])
    # The ISIC 2020 order (melanoma second) gives the same numbers.
    flipped = compute_metrics(1 - y, probs[:, ::-1], n_bootstrap=0, classes=("other", "mel"), malignant=("mel",))
    assert flipped["binary"]["auc"] == pytest.approx(b["auc"]) and flipped["binary"]["positives"] == 12


def test_the_card_of_a_custom_binary_model_carries_its_own_positive_class_figures() -> None:
    """A malignant class other than `mel` leaves the melanoma figure null; the card carries the binary block's."""
    from skinlesion.card import _summary

    y, probs = _melanoma_nevus()
    m = compute_metrics(y, probs, n_bootstrap=0, classes=("malignant", "benign"), malignant=("malignant",))
    summary = _summary(m)
    assert summary["melanoma_sensitivity_at_specificity_0.9"] is None  # no class is called mel
    assert summary["positive"] == "malignant" and summary["auc"] == m["binary"]["auc"]
    assert summary["positive_sensitivity_at_specificity_0.9"] == m["binary"]["sensitivity_at_specificity_0.9"]
    assert summary["positive_sensitivity_at_specificity_0.9"] is not None
    assert "positive" not in _summary(compute_metrics(y, probs, n_bootstrap=0, classes=("a", "b"), malignant=()))


@pytest.mark.parametrize("malignant", [(), ("melanoma", "nevus")])
def test_a_binary_dataset_without_exactly_one_malignant_class_gets_no_binary_metrics_and_says_why(malignant) -> None:
    from skinlesion.metrics import selection

    y, probs = _melanoma_nevus()
    m = compute_metrics(y, probs, n_bootstrap=0, classes=("melanoma", "nevus"), malignant=malignant)
    assert m["binary"]["positive"] is None and m["binary"]["note"].startswith("no binary metrics: ")
    assert ("no class" if not malignant else "2 classes (melanoma, nevus)") in m["binary"]["note"]
    assert selection(m)["metric"] == "val_balanced_accuracy"  # nothing to rank an AUC of: the multi-class rule


def test_subgroups_of_a_binary_dataset_report_the_malignant_class() -> None:
    from skinlesion.subgroups import limitation_lines, subgroup_metrics

    y, probs = _melanoma_nevus()
    metas = [{"sex": "female"}] * y.size
    sub = subgroup_metrics(y, probs, metas, ("melanoma", "nevus"), malignant=("melanoma",), n_bootstrap=50)
    entry = sub["sex"]["female"]["positive"]
    assert (entry["class"], entry["n"], entry["sensitivity"]) == ("melanoma", 12, 1.0)  # not nevus: 30, 0.67
    assert limitation_lines(sub)[0].startswith("melanoma sensitivity in female patients (validation): 1.00 (n=12")
    none = subgroup_metrics(y, probs, metas, ("melanoma", "nevus"), malignant=(), n_bootstrap=50)
    assert "positive" not in none["sex"]["female"] and limitation_lines(none) == []


def test_a_proportion_gets_a_wilson_interval_never_a_zero_width_one() -> None:
    """12 of 12 melanomas found: the percentile bootstrap said 1.00-1.00; Wilson says 0.76-1.00."""
    from skinlesion.metrics import Z95, wilson_interval
    from skinlesion.subgroups import limitation_lines, subgroup_metrics

    low, high = wilson_interval(12, 12)
    assert low == pytest.approx(12 / (12 + Z95**2)) and high == 1.0
    low0, high0 = wilson_interval(0, 12)
    assert low0 == 0.0 and high0 == pytest.approx(1 - low)  # symmetric
    assert wilson_interval(0, 0) == (None, None)
    y, probs = _melanoma_nevus()
    metas = [{"localization": "back"}] * y.size
    sub = subgroup_metrics(y, probs, metas, ("melanoma", "nevus"), malignant=("melanoma",), n_bootstrap=200)
    assert sub["site"]["back"]["positive"]["sensitivity_ci95"] == pytest.approx([low, 1.0])
    assert "(n=12, 95% CI 0.76-1.00)" in limitation_lines(sub)[0]
    # Two images per lesion: the interval counts the 6 lesions, not the 12 images (they are not independent).
    lesions = np.concatenate([np.arange(12) // 2, 100 + np.arange(30)])
    sub = subgroup_metrics(y, probs, metas, ("melanoma", "nevus"), lesions, 200, malignant=("melanoma",))
    assert sub["site"]["back"]["positive"]["sensitivity_ci95"][0] == pytest.approx(wilson_interval(6, 6)[0])


def test_a_bootstrap_interval_that_collapses_is_reported_as_not_estimable() -> None:
    """Balanced accuracy and AUC are not proportions: their bootstrap stays, but a zero-width one is not printed."""
    from skinlesion.evaluate import EvalResult, Predictions
    from skinlesion.metrics import NOT_ESTIMABLE

    y = np.array([0] * 12 + [1] * 20)
    probs = np.stack([np.where(y == 0, 0.9, 0.1), np.where(y == 0, 0.1, 0.9)], axis=1)  # perfectly separated
    m = compute_metrics(y, probs, n_bootstrap=200, classes=("other", "mel"), malignant=("mel",))
    assert m["balanced_accuracy"] == 1.0 and m["balanced_accuracy_ci95"] == [None, None]
    assert m["balanced_accuracy_ci95_note"] == NOT_ESTIMABLE
    assert m["binary"]["auc"] == 1.0 and m["binary"]["auc_ci95"] == [None, None]
    assert m["binary"]["auc_ci95_note"] == NOT_ESTIMABLE
    preds = Predictions(keys=[], image_ids=[], lesion_ids=[], labels=y, probs=probs, classes=("other", "mel"))
    text = EvalResult(metrics={**m, "split": "val"}, predictions=preds, files={}).summary()
    assert "1.000-1.000" not in text and "1.00-1.00" not in text and text.count("95% CI not estimable") == 2
