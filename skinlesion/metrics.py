"""Clinical metrics for a dermoscopy classifier, from labels and predicted probabilities.

Everything here is a pure function of ``y_true`` (class indices, shape [N]) and ``probs`` (softmax
outputs, shape [N, C], classes in the dataset description's order: 7 for HAM10000, 8 for ISIC 2019, 2
for ISIC 2020), so the trainer's per-epoch validation, the `evaluate` command and the tests all compute
the same numbers. A binary run (ISIC 2020: melanoma against the rest) is scored as ISIC 2020 was: ROC AUC
of the positive class with a bootstrap interval over groups (patients), sensitivity at fixed
specificities, and the partial AUC above 80% sensitivity (the challenge's secondary metric).

Why these metrics: HAM10000 is ~67% nevi, so plain accuracy rewards a model that never finds a
melanoma. Balanced accuracy (the mean of the per-class recalls; the ISIC 2018 Task 3 metric) weighs
every diagnosis equally, and melanoma sensitivity at a fixed specificity is the number a clinician
asks for first. The bootstrap interval says how much of a difference between two runs is noise: a
test split of ~1,500 images has only ~17 dermatofibromas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from skinlesion.labels import CLASSES, NUM_CLASSES

ECE_BINS = 15
SPECIFICITIES: tuple[float, ...] = (0.8, 0.9)
MELANOMA = CLASSES.index("mel")  # HAM10000's index; other datasets find "mel" in their own classes
PARTIAL_AUC_SENSITIVITY = 0.8
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval
NOT_ESTIMABLE = "not estimable: every bootstrap resample gave the same value (too few samples to vary)"


def positive_class(classes: Sequence[str], malignant: Sequence[str] | None = None) -> tuple[int | None, str | None]:
    """The index of the class binary metrics score as positive, or None and why.

    The positive class is the dataset's malignant one, whatever the order of the classes: a custom
    melanoma/nevus spec sorts melanoma first, and scoring ``classes[1]`` reported nevus recall as melanoma
    sensitivity. `malignant` is the description's malignant codes; None (no description at hand) means
    melanoma's code when the classes have it. No class, or more than one, is never resolved by a guess.
    """
    classes = list(classes)
    if malignant is None:
        malignant = ("mel",) if "mel" in classes else ()
    marked = [c for c in classes if c in set(malignant)]
    if len(marked) == 1:
        return classes.index(marked[0]), None
    if not marked:
        return None, f"no class of {classes} is marked malignant, so there is no positive class to score"
    return None, f"{len(marked)} classes ({', '.join(marked)}) are marked malignant; binary metrics need exactly one"


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion: (None, None) for n = 0.

    Unlike a percentile bootstrap it does not collapse to 1.00-1.00 when all of 12 melanomas were found
    (it gives 0.76-1.00), and unlike the normal approximation it stays inside [0, 1]. `successes` may be
    fractional: a clustered proportion is passed as (share x number of groups, number of groups).
    """
    if n <= 0:
        return None, None
    p = min(max(successes / n, 0.0), 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if p == 0.0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends, not 1e-17 off
    high = 1.0 if p == 1.0 else min(1.0, centre + half)
    return low, high


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float | None, float | None]:
    """The percentile interval of bootstrap `values`; (None, None) when it has zero width.

    A bootstrap of a small, perfectly separated sample gives the same value on every resample, and
    "95% CI 1.00-1.00" would claim a certainty that 12 images cannot give: such an interval is not
    estimable this way, and is reported as such (`NOT_ESTIMABLE`).
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not values.size:
        return None, None
    tail = (1.0 - confidence) / 2 * 100
    low, high = (float(v) for v in np.percentile(values, [tail, 100 - tail]))
    if values.size > 1 and high - low <= 1e-12:  # (one resample is a test's way to see the statistic itself)
        return None, None
    return low, high


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
    n_classes: int = NUM_CLASSES,
) -> tuple[float, float]:
    """Percentile bootstrap interval of balanced accuracy, resampling whole `groups` (e.g. lesion_id).

    Images of one lesion are near-duplicates, so resampling lesions rather than images keeps the
    interval honest. Each group's contribution to the confusion matrix is counted once; a resample is
    then a matrix product of how often each group was drawn with those contributions, so 1,000
    resamples of a test split take milliseconds. NaN, NaN when the interval has zero width
    (`percentile_interval`).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    if y_true.size == 0 or n_resamples <= 0:
        return (float("nan"), float("nan"))
    if groups is None:
        group_index = np.arange(y_true.size)
    else:
        _, group_index = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(group_index.max()) + 1
    k = n_classes
    cell = y_true * k + np.asarray(y_pred, dtype=np.int64)
    cells = k * k
    per_group = np.bincount(group_index * cells + cell, minlength=n_groups * cells).reshape(n_groups, cells)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_resamples, n_groups))
    draws += np.arange(n_resamples)[:, None] * n_groups
    times_drawn = np.bincount(draws.ravel(), minlength=n_resamples * n_groups).reshape(n_resamples, n_groups)
    cms = (times_drawn.astype(np.float64) @ per_group).reshape(n_resamples, k, k)
    low, high = percentile_interval(balanced_accuracy(cms), confidence)
    return (float("nan"), float("nan")) if low is None else (low, high)


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
    classes: Sequence[str] = CLASSES,
    malignant: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Everything metrics.json holds (JSON-ready: plain floats, None for undefined values).

    `groups` (e.g. lesion_id per sample) makes the bootstrap resample lesions instead of images. `classes`
    are the dataset's, in column order; with two of them the binary metrics are added, for the class that
    `malignant` (the description's malignant codes) marks (`positive_class`).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    if probs.ndim != 2 or probs.shape != (y_true.size, k):
        raise ValueError(f"probs has shape {probs.shape}, expected ({y_true.size}, {k})")
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, k)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diagonal(cm).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    aucs = one_vs_rest_auc(y_true, probs)
    defined_aucs = [a for a in aucs if a is not None]
    low, high = bootstrap_balanced_accuracy(y_true, y_pred, groups, n_bootstrap, seed=seed, n_classes=k)

    melanoma: dict[str, Any] = {}
    mel = list(classes).index("mel") if "mel" in classes else None
    for spec in SPECIFICITIES:
        point = None if mel is None else sensitivity_at_specificity(y_true == mel, probs[:, mel], spec)
        melanoma[sensitivity_key(spec)] = None if point is None else point[0]
        melanoma[f"threshold_at_specificity_{spec:g}"] = None if point is None else point[1]
    melanoma["sensitivity_at_argmax"] = None if mel is None else _or_none(recalls(cm)[mel])
    melanoma["auc"] = None if mel is None else aucs[mel]

    out = {
        "n_samples": int(y_true.size),
        "accuracy": float(tp.sum() / max(y_true.size, 1)),
        "log_loss": log_loss(y_true, probs) if y_true.size else None,
        "balanced_accuracy": _or_none(balanced_accuracy(cm)) if y_true.size else None,
        "balanced_accuracy_ci95": [_or_none(low), _or_none(high)],
        **({"balanced_accuracy_ci95_note": NOT_ESTIMABLE} if n_bootstrap > 0 and y_true.size and np.isnan(low) else {}),
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
            for i, dx in enumerate(classes)
        },
        "classes": list(classes),
        "confusion_matrix": cm.tolist(),
    }
    if k == 2:
        index, why = positive_class(classes, malignant)
        if index is None:
            out["binary"] = {"positive": None, "note": f"no binary metrics: {why}"}
        else:
            positive = y_true == index
            out["binary"] = binary_metrics(positive, probs[:, index], groups, n_bootstrap, seed, classes[index])
    return out


def partial_auc_above_sensitivity(positive: np.ndarray, scores: np.ndarray, sensitivity: float) -> float | None:
    """The area under the ROC curve from the point where sensitivity reaches `sensitivity` to the right end
    (1.0 for a perfect model): the ISIC 2020 secondary metric, computed as `isic-challenge-scoring` does (a
    point interpolated at exactly that sensitivity, then the trapezoids beyond it). None without positives or
    negatives."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return None
    fpr, tpr, _ = roc_curve(positive, scores, drop_intermediate=False)
    i = int(np.searchsorted(tpr, sensitivity, side="left"))
    fpr_at = float(np.interp(sensitivity, tpr[i - 1 : i + 1], fpr[i - 1 : i + 1]))
    x = np.concatenate([[fpr_at], fpr[i:]])
    y = np.concatenate([[sensitivity], tpr[i:]])
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def bootstrap_auc(
    positive: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray | None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of ROC AUC, resampling whole groups (patients for ISIC 2020).

    A resample is a weight per sample (how often its group was drawn), and AUC is the weighted share of
    (positive, negative) pairs ranked right, ties counting half: one sort, then sums over tie blocks for
    100 resamples at a time, so 1,000 resamples of a test split take milliseconds rather than 1,000
    ``roc_auc_score`` calls. A resample without positives or without negatives has no AUC and is skipped;
    None, None when no resample has one or all give the same value (`percentile_interval`).
    """
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if positive.all() or not positive.any() or n_resamples <= 0:
        return None, None
    _, group_index = np.unique(np.arange(positive.size) if groups is None else np.asarray(groups), return_inverse=True)
    n_groups = int(group_index.max()) + 1
    order = np.argsort(scores, kind="stable")
    _, starts = np.unique(scores[order], return_index=True)  # tie blocks in ascending score order
    pos, sorted_groups = positive[order], group_index[order]
    rng = np.random.default_rng(seed)
    values = []
    for first in range(0, n_resamples, 100):
        count = min(100, n_resamples - first)
        draws = rng.integers(0, n_groups, size=(count, n_groups)) + np.arange(count)[:, None] * n_groups
        drawn = np.bincount(draws.ravel(), minlength=count * n_groups).reshape(count, n_groups).astype(np.float64)
        weights = drawn[:, sorted_groups]  # [count, N] in score order
        p = np.add.reduceat(weights * pos, starts, axis=1)
        n = np.add.reduceat(weights * ~pos, starts, axis=1)
        below = np.cumsum(n, axis=1) - n
        pairs = p.sum(1) * n.sum(1)
        ok = pairs > 0
        values.append((p * (below + 0.5 * n)).sum(1)[ok] / pairs[ok])
    return percentile_interval(np.concatenate(values), confidence)


def binary_metrics(
    y_true: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    positive: str = "mel",
) -> dict[str, Any]:
    """The ISIC 2020 numbers for the positive class (`y_true` 1 or True) against the rest: AUC with its bootstrap
    CI (over groups), sensitivity at fixed specificities, and the partial AUC above 80% sensitivity.
    `scores` are the positive class's probabilities, `positive` its code."""
    is_pos = np.asarray(y_true).astype(np.int64) == 1
    defined = is_pos.any() and not is_pos.all()
    low, high = bootstrap_auc(is_pos, scores, groups, n_bootstrap, seed)
    out: dict[str, Any] = {
        "positive": positive,
        "positives": int(is_pos.sum()),
        "negatives": int((~is_pos).sum()),
        "auc": float(roc_auc_score(is_pos, scores)) if defined else None,
        "auc_ci95": [low, high],
        **({"auc_ci95_note": NOT_ESTIMABLE} if defined and n_bootstrap > 0 and low is None else {}),
        f"partial_auc_above_sensitivity_{PARTIAL_AUC_SENSITIVITY:g}": partial_auc_above_sensitivity(
            is_pos, scores, PARTIAL_AUC_SENSITIVITY
        ),
    }
    for spec in SPECIFICITIES:
        point = sensitivity_at_specificity(is_pos, scores, spec)
        out[sensitivity_key(spec)] = None if point is None else point[0]
    return out


LOWER_IS_BETTER = frozenset({"val_loss"})  # best.pt's metrics that improve downwards


def selection(metrics: dict[str, Any]) -> dict[str, Any]:
    """What training keeps best.pt by, on these validation `metrics`: {metric, value, keeps, note}. The trainer,
    `evaluate` (metrics.json) and the model card all ask here, so they name the same metric.

    Balanced accuracy; for a binary task with a positive class (ISIC 2020: melanoma) the ROC AUC, the challenge's
    metric. Whether AUC is defined depends only on the validation labels, so it is the same every epoch: a
    validation split without a positive (or without a negative) image has none in any epoch, and best.pt is then
    kept by the lowest validation loss, with a `note` that says so (it used to become the last epoch, silently).
    """
    binary = metrics.get("binary") or {}
    if binary.get("positive") is None:  # not binary, or no single malignant class to score
        metric, value, note = "val_balanced_accuracy", metrics["balanced_accuracy"], None
    elif binary.get("auc") is not None:
        metric, value, note = "val_auc", binary["auc"], None
    else:
        metric, value = "val_loss", metrics["log_loss"]
        note = (
            f"val_auc is undefined: the validation split has {binary['positives']} {binary['positive']} and "
            f"{binary['negatives']} other images, so best.pt is kept by the lowest val_loss instead; prepare "
            f"the dataset so that validation holds both classes"
        )
    keeps = "lowest" if metric in LOWER_IS_BETTER else "highest"
    return {"metric": metric, "value": value, "keeps": keeps, "note": note}


def _or_none(value: float) -> float | None:
    """NaN is not JSON: undefined values are written as null."""
    value = float(value)
    return None if np.isnan(value) else value
