"""Risk bands: the cut-offs measured on validation, whether they can separate anything, and the band of one
probability.

The card (`card.calibrate`) measures the cut-offs once, on the validation split's malignant probability (the sum
over the checkpoint's malignant classes); predict and serve band every image against them (`report`). Kept apart
from the card's files and checks because this is the arithmetic both sides must agree on: one place says what
"high", "elevated" and "below_cutoffs" mean, and when a cut-off is no cut-off at all. It needs numpy only.
"""

from __future__ import annotations

import math

import numpy as np

SENSITIVITIES = (0.95, 0.80)  # validation operating points that bound the risk bands
MIN_RISK_POSITIVES = 10  # fewer malignant validation images set no cut-offs (as subgroups.MIN_POSITIVES)
TOP = 1.0 - 1e-6  # a cut-off at the top of the scale: only a saturated probability (1.0 in float32) reaches it


def risk_thresholds(malignant: np.ndarray, is_malignant: np.ndarray) -> dict[str, float | None]:
    """The malignant-probability threshold at which validation sensitivity for malignancy is each target.

    For sensitivity s: the largest t such that at least s of the malignant validation images have a
    malignant probability >= t. None when validation has no malignant image.
    """
    positives = np.sort(malignant[is_malignant.astype(bool)])[::-1]
    out: dict[str, float | None] = {}
    for s in SENSITIVITIES:
        key = f"sensitivity_{s:.2f}"
        out[key] = float(positives[math.ceil(s * len(positives)) - 1]) if len(positives) else None
    return out


def cutoff_problem(malignant: np.ndarray, is_malignant: np.ndarray, thresholds: dict[str, float | None]) -> str | None:
    """Why the validation cut-offs cannot separate anything, or None when they can.

    A 2-epoch ISIC 2020 run put both cut-offs at 1.0 (its melanoma probabilities saturated), and the page then
    said "malignant probability below >99%, the cut-off": a threshold worded as one that no real image is above.
    A cut-off separates nothing when it is at the top of the scale, or when every validation image, malignant or
    not, reaches it; and cut-offs from fewer than MIN_RISK_POSITIVES malignant images are not cut-offs at all.
    """
    n = int(np.asarray(is_malignant, dtype=bool).sum())
    if n < MIN_RISK_POSITIVES:
        return f"validation has {n} malignant images, fewer than {MIN_RISK_POSITIVES} to set them on"
    cuts = {key: value for key, value in thresholds.items() if value is not None}
    for key, value in cuts.items():
        point = key.removeprefix("sensitivity_")
        if value >= TOP:
            return f"the sensitivity {point} cut-off is {value:.6g}, the top of the scale (saturated probabilities)"
        if float(np.min(malignant)) >= value:
            return f"every validation image, malignant or not, scores at or above the sensitivity {point} cut-off"
    return None


def risk_band(malignant_probability: float, thresholds: dict[str, float | None]) -> str | None:
    """high (>= the 0.80-sensitivity point), elevated (>= the 0.95 point), below_cutoffs; None without thresholds.

    Not "low": a lesion below the 0.95 point is not low-risk, up to 5% of malignant validation lesions fell there."""
    high, elevated = thresholds.get("sensitivity_0.80"), thresholds.get("sensitivity_0.95")
    if high is None or elevated is None:
        return None
    if malignant_probability >= high:
        return "high"
    return "elevated" if malignant_probability >= elevated else "below_cutoffs"
