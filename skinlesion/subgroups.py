"""Subgroup metrics: where a model is weaker, by sex, age band, anatomical site and dx_type.

A model's overall balanced accuracy can hide a melanoma sensitivity of 0.6 on acral sites or in patients
over 70. For each subgroup this reports its count, per-class recall, the positive class's sensitivity
(argmax) and AUC: melanoma for a multi-class dataset, the malignant class of a binary one. Sensitivity, a
proportion, gets a Wilson interval over its groups (lesions, or patients for ISIC 2020: images of one lesion
are not independent); AUC a percentile bootstrap that resamples whole groups inside the subgroup, reported
as not estimable when every resample gives the same value. A number from fewer than `MIN_POSITIVES`
positives (melanomas for sensitivity and AUC, the class's images for a recall) is not a number anyone
should act on: it is reported as too small, with its count, instead.

The attributes come from each sample's metadata in the shards (`sex`, `age`, `localization`, `dx_type`);
a dataset without one (ISIC 2019 and 2020 have no dx_type: ISIC 2020's ``diagnosis`` is the label itself)
simply has no subgroups for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from skinlesion.metrics import NOT_ESTIMABLE, bootstrap_auc, positive_class, wilson_interval

MIN_POSITIVES = 10
ATTRIBUTES = {"sex": "sex", "age_band": "age", "site": "localization", "dx_type": "dx_type"}
AGE_BANDS = ("<30", "30-50", "50-70", ">=70")
_MISSING = {"", "unknown", "nan", "none", "null"}


def age_band(age: Any) -> str | None:
    """<30, 30-50, 50-70 or >=70 (lower bounds inclusive); None for a missing age."""
    try:
        years = float(age)
    except (TypeError, ValueError):
        return None
    if np.isnan(years):
        return None
    return AGE_BANDS[int(years >= 30) + int(years >= 50) + int(years >= 70)]


def value_of(meta: dict[str, Any], attribute: str) -> str | None:
    """The subgroup a sample belongs to for `attribute` (one of ATTRIBUTES), None when unknown."""
    raw = meta.get(ATTRIBUTES[attribute])
    if attribute == "age_band":
        return age_band(raw)
    text = str(raw).strip().lower() if raw is not None else ""
    return None if text in _MISSING else text


def sensitivity_interval(hit: np.ndarray, groups: np.ndarray) -> tuple[float | None, float | None]:
    """Wilson interval of the share of positives found, with one observation per group: the share of images
    found, over the number of distinct groups among the positives (12 melanomas of 12 lesions, all found:
    0.76-1.00, where a percentile bootstrap said 1.00-1.00)."""
    if hit.size == 0:
        return None, None
    n_groups = np.unique(groups).size
    return wilson_interval(float(hit.mean()) * n_groups, n_groups)


def _too_small(n: int, what: str) -> dict[str, Any]:
    return {"too_small": True, "n": n, "note": f"fewer than {MIN_POSITIVES} {what} (n={n}): too small to report"}


def _one(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray,
    classes: Sequence[str],
    positive: int | None,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    y_pred = probs.argmax(axis=1)
    out: dict[str, Any] = {"n": int(y_true.size), "per_class_recall": {}}
    for c, dx in enumerate(classes):
        support = int((y_true == c).sum())
        if support < MIN_POSITIVES:
            out["per_class_recall"][dx] = _too_small(support, f"{dx} images")
        else:
            recall = float((y_pred[y_true == c] == c).mean())
            out["per_class_recall"][dx] = {"recall": recall, "n": support}
    if positive is None:
        return out
    is_pos = y_true == positive
    n_pos = int(is_pos.sum())
    name = classes[positive]
    if n_pos < MIN_POSITIVES:
        out["positive"] = {**_too_small(n_pos, f"{name} images"), "class": name}
        return out
    hit = y_pred[is_pos] == positive
    low, high = sensitivity_interval(hit, groups[is_pos])
    entry: dict[str, Any] = {
        "class": name,
        "n": n_pos,
        "sensitivity": float(hit.mean()),
        "sensitivity_ci95": [low, high],
        "sensitivity_ci95_method": "wilson over groups",
    }
    if is_pos.all():
        entry.update(auc=None, auc_ci95=[None, None])
    else:
        auc_low, auc_high = bootstrap_auc(is_pos, probs[:, positive], groups, n_bootstrap, seed)
        entry.update(auc=float(roc_auc_score(is_pos, probs[:, positive])), auc_ci95=[auc_low, auc_high])
        if n_bootstrap > 0 and auc_low is None:
            entry["auc_ci95_note"] = NOT_ESTIMABLE
    out["positive"] = entry
    return out


def subgroup_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    metas: Sequence[dict[str, Any]],
    classes: Sequence[str],
    groups: Sequence[Any] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    malignant: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """{attribute: {value: metrics}} for sex, age_band, site and dx_type (what metrics.json's ``subgroups`` holds).

    The positive class is melanoma for a dataset of more than two classes that has one; for a binary dataset
    it is the class `malignant` marks (`metrics.positive_class`), never simply the second one. Without one,
    only per-class recalls are reported.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    groups_arr = np.asarray(groups if groups is not None else np.arange(y_true.size), dtype=object).astype(str)
    if len(classes) == 2:
        positive, _ = positive_class(classes, malignant)
    else:
        positive = list(classes).index("mel") if "mel" in classes else None
    out: dict[str, dict[str, Any]] = {}
    for attribute in ATTRIBUTES:
        values = np.array([value_of(m, attribute) for m in metas], dtype=object)
        present = sorted({v for v in values if v is not None})
        if not present:
            continue
        out[attribute] = {}
        for value in present:
            rows = values == value
            out[attribute][value] = _one(
                y_true[rows], probs[rows], groups_arr[rows], classes, positive, n_bootstrap, seed
            )
    return out


def limitation_lines(subgroups: dict[str, dict[str, Any]], split: str = "validation") -> list[str]:
    """The model card's subgroup lines, weakest first: "melanoma sensitivity on acral sites: 0.62 (n=14)"."""
    words = {"sex": "in {} patients", "age_band": "at age {}", "site": "on {} sites", "dx_type": "confirmed by {}"}
    scored, small = [], []
    for attribute, by_value in subgroups.items():
        for value, m in by_value.items():
            entry = m.get("positive")
            if entry is None:
                continue
            where = words[attribute].format(value)
            name = _positive_name(entry.get("class", "mel"))
            if entry.get("too_small"):
                small.append(f"{where} (n={entry['n']})")
            else:
                low, high = entry["sensitivity_ci95"]
                ci = f", 95% CI {low:.2f}-{high:.2f}" if low is not None else ""
                line = f"{name} sensitivity {where} ({split}): {entry['sensitivity']:.2f} (n={entry['n']}{ci})"
                scored.append((entry["sensitivity"], line))
    lines = [line for _, line in sorted(scored, key=lambda s: s[0])]
    if small:
        lines.append(f"Too few {_plural(_name_of(subgroups))} to report a sensitivity ({split}): {', '.join(small)}.")
    return lines


def _positive_name(code: Any) -> str:
    return "melanoma" if code == "mel" else str(code)


def _name_of(subgroups: dict[str, dict[str, Any]]) -> str:
    """The positive class's name in `subgroups` (entries too small to score record none: melanoma's code then
    is only the default when no entry names another class)."""
    for by_value in subgroups.values():
        for m in by_value.values():
            entry = m.get("positive") or {}
            if "class" in entry:
                return _positive_name(entry["class"])
    return "melanoma"


def _plural(name: str) -> str:
    return f"{name}s" if name == "melanoma" else f"{name} images"


def subgroup_lines(subgroups: dict[str, dict[str, Any]]) -> list[str]:
    """The evaluation summary's subgroup lines: the positive class's sensitivity and AUC per subgroup."""
    lines = []
    for attribute, by_value in subgroups.items():
        cells = []
        for value, m in by_value.items():
            entry = m.get("positive")
            if entry is None:
                continue
            if entry.get("too_small"):
                cells.append(f"{value} too small (n={entry['n']})")
            else:
                auc = "n/a" if entry["auc"] is None else f"{entry['auc']:.2f}"
                cells.append(f"{value} {entry['sensitivity']:.2f}/{auc} (n={entry['n']})")
        if cells:
            lines.append(f"  by {attribute:<9} " + "; ".join(cells))
    if lines:
        name = _name_of(subgroups)
        lines.insert(0, f"  subgroups ({name} sensitivity/AUC, n {_plural(name)}; 95% CIs in metrics.json):")
    return lines
