"""Clinical metrics for a 7-class dermoscopy classifier, from labels and predicted probabilities.

Everything here is a pure function of ``y_true`` (class indices, shape [N]) and ``probs`` (softmax
outputs, shape [N, 7], classes in `labels.CLASSES` order), so the trainer's per-epoch validation, the
`evaluate` command and the tests all compute the same numbers.

Why these metrics: HAM10000 is ~67% nevi, so plain accuracy rewards a model that never finds a
melanoma. Balanced accuracy (the mean of the per-class recalls; the ISIC 2018 Task 3 metric) weighs
every diagnosis equally, and melanoma sensitivity at a fixed specificity is the number a clinician
asks for first. The bootstrap interval says how much of a difference between two runs is noise: a
test split of ~1,500 images has only ~17 dermatofibromas.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from skinlesion.labels import CLASSES, NUM_CLASSES

ECE_BINS = 15
SPECIFICITIES: tuple[float, ...] = (0.8, 0.9)
MELANOMA = CLASSES.index("mel")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts [n_classes, n_classes]: rows are the true class, columns the predicted one."""
    flat = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def recalls(cm: np.ndarray) -> np.ndarray:
    """Per-class recall (sensitivity) from a confusion matrix; NaN for a class with no true samples."""
    support = cm.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diagonal(cm, axis1=-2, axis2=-1) / support


def balanced_accuracy(cm: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present in the truth (what sklearn and the ISIC scorer compute).

    Works on one matrix [C, C] or a stack [B, C, C] (the bootstrap).
    """
    return np.nanmean(recalls(cm), axis=-1)


def bootstrap_balanced_accuracy(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: np.ndarray | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of balanced accuracy, resampling whole `groups` (e.g. lesion_id).

    Images of one lesion are near-duplicates, so resampling lesions rather than images keeps the
    interval honest. Each group's contribution to the confusion matrix is counted once; a resample is
    then a matrix product of how often each group was drawn with those contributions, so 1,000
    resamples of a test split take milliseconds.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    if y_true.size == 0 or n_resamples <= 0:
        return (float("nan"), float("nan"))
    if groups is None:
        group_index = np.arange(y_true.size)
    else:
        _, group_index = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(group_index.max()) + 1
    cell = y_true * NUM_CLASSES + np.asarray(y_pred, dtype=np.int64)
    cells = NUM_CLASSES * NUM_CLASSES
    per_group = np.bincount(group_index * cells + cell, minlength=n_groups * cells).reshape(n_groups, cells)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_resamples, n_groups))
    draws += np.arange(n_resamples)[:, None] * n_groups
    times_drawn = np.bincount(draws.ravel(), minlength=n_resamples * n_groups).reshape(n_resamples, n_groups)
    cms = (times_drawn.astype(np.float64) @ per_group).reshape(n_resamples, NUM_CLASSES, NUM_CLASSES)
    scores = balanced_accuracy(cms)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(scores, [tail, 100 - tail])
    return float(low), float(high)


def one_vs_rest_auc(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """ROC AUC of each class against the rest; None where the class is absent (or is everything)."""
    out: list[float | None] = []
    for c in range(probs.shape[1]):
        positive = y_true == c
        if positive.all() or not positive.any():
            out.append(None)
        else:
            out.append(float(roc_auc_score(positive, probs[:, c])))
    return out


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Top-1 confidence vs accuracy in `n_bins` equal-width bins over (0, 1] (right-closed).

    Returns arrays of length n_bins: count, confidence (mean), accuracy (mean); empty bins hold NaN.
    """
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    bin_of = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bin_of, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bin_of, weights=confidence, minlength=n_bins) / count
        mean_acc = np.bincount(bin_of, weights=correct, minlength=n_bins) / count
    return {"count": count, "confidence": mean_conf, "accuracy": mean_acc}


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: sum over bins of (share of samples) x |accuracy - mean confidence|."""
    bins = reliability_bins(y_true, probs, n_bins)
    filled = bins["count"] > 0
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(bins["count"][filled] / bins["count"].sum() * gap))


def log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (the validation loss, without label smoothing)."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(y_true.size), y_true], 1e-12, None))))


def sensitivity_key(specificity: float) -> str:
    """The key of metrics["melanoma"] that holds the sensitivity at `specificity` (one of SPECIFICITIES)."""
    return f"sensitivity_at_specificity_{specificity:g}"


def sensitivity_at_specificity(
    positive: np.ndarray, scores: np.ndarray, specificity: float
) -> tuple[float, float] | None:
    """Best sensitivity over thresholds whose specificity is >= `specificity`, and that threshold.

    The operating point a screening tool would be set to: "flag as melanoma when p(mel) >= t".
    None when there are no positives or no negatives to measure it on.
    """
    if positive.all() or not positive.any():
        return None
    fpr, tpr, thresholds = roc_curve(positive, scores, drop_intermediate=False)
    allowed = fpr <= 1.0 - specificity + 1e-12
    best = int(np.argmax(np.where(allowed, tpr, -1.0)))
    return float(tpr[best]), float(min(thresholds[best], 1.0))


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything metrics.json holds (JSON-ready: plain floats, None for undefined values).

    `groups` (e.g. lesion_id per sample) makes the bootstrap resample lesions instead of images.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (y_true.size, NUM_CLASSES):
        raise ValueError(f"probs has shape {probs.shape}, expected ({y_true.size}, {NUM_CLASSES})")
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diagonal(cm).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    aucs = one_vs_rest_auc(y_true, probs)
    defined_aucs = [a for a in aucs if a is not None]
    low, high = bootstrap_balanced_accuracy(y_true, y_pred, groups, n_bootstrap, seed=seed)

    melanoma: dict[str, Any] = {}
    for spec in SPECIFICITIES:
        point = sensitivity_at_specificity(y_true == MELANOMA, probs[:, MELANOMA], spec)
        melanoma[sensitivity_key(spec)] = None if point is None else point[0]
        melanoma[f"threshold_at_specificity_{spec:g}"] = None if point is None else point[1]
    melanoma["sensitivity_at_argmax"] = _or_none(recalls(cm)[MELANOMA])
    melanoma["auc"] = aucs[MELANOMA]

    return {
        "n_samples": int(y_true.size),
        "accuracy": float(tp.sum() / max(y_true.size, 1)),
        "log_loss": log_loss(y_true, probs) if y_true.size else None,
        "balanced_accuracy": _or_none(balanced_accuracy(cm)) if y_true.size else None,
        "balanced_accuracy_ci95": [_or_none(low), _or_none(high)],
        "bootstrap": {"resamples": n_bootstrap, "seed": seed, "unit": "group" if groups is not None else "image"},
        "auc_macro": float(np.mean(defined_aucs)) if defined_aucs else None,
        "ece": expected_calibration_error(y_true, probs) if y_true.size else None,
        "melanoma": melanoma,
        "per_class": {
            dx: {
                "precision": float(precision[i]),
                "recall": _or_none(recall[i]) if support[i] else None,
                "f1": float(f1[i]),
                "support": int(support[i]),
                "auc": aucs[i],
            }
            for i, dx in enumerate(CLASSES)
        },
        "classes": list(CLASSES),
        "confusion_matrix": cm.tolist(),
    }


def _or_none(value: float) -> float | None:
    """NaN is not JSON: undefined values are written as null."""
    value = float(value)
    return None if np.isnan(value) else value
