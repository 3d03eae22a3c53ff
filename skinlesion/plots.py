"""The three evaluation figures: confusion matrix, one-vs-rest ROC curves, reliability diagram.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no global backend
state), so plotting works on headless nodes and inside the trainer without touching the user's
matplotlib settings. Each PNG is written to a temporary name and renamed, so a reader (W&B, a
browser) never sees half a file.

Class codes are data (a custom dataset's spec names them), drawn literally: each figure is built and saved
under `LITERAL_TEXT`, so a code such as ``$\\frac$`` is neither parsed as mathtext (which raised at the last
validation, before best.pt was written) nor handed to LaTeX by a user's ``text.usetex``. The settings are
restored when the function returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from skinlesion.files import atomic_write
from skinlesion.labels import CLASSES
from skinlesion.metrics import ECE_BINS, expected_calibration_error, one_vs_rest_auc, reliability_bins

# Text as given: no mathtext ($...$), no LaTeX, and tick labels without mathtext (their numbers need none).
LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False, "axes.formatter.use_mathtext": False}


@rc_context(LITERAL_TEXT)
def plot_confusion_matrix(cm: np.ndarray, out: Path, title: str = "", classes: Sequence[str] = CLASSES) -> Path:
    """Counts and row-normalised (recall per true class) side by side, class codes on both axes."""
    cm = np.asarray(cm)
    support = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(support > 0, cm / np.maximum(support, 1), np.nan)
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    for ax, data, label, fmt in (
        (fig.add_subplot(1, 2, 1), cm, "count", "d"),
        (fig.add_subplot(1, 2, 2), normalised, "share of true class (recall on the diagonal)", ".2f"),
    ):
        image = ax.imshow(data, cmap="Blues", vmin=0, vmax=np.nanmax(data) if np.isfinite(data).any() else 1)
        fig.colorbar(image, ax=ax, shrink=0.8, label=label)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), [f"{dx} ({n})" for dx, n in zip(classes, support[:, 0], strict=True)])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true (support)")
        threshold = np.nanmax(data) / 2 if np.isfinite(data).any() else 0
        for (i, j), value in np.ndenumerate(data):
            if np.isfinite(value):
                text = format(int(value), fmt) if fmt == "d" else format(value, fmt)
                colour = "white" if value > threshold else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    fig.suptitle(title or "Confusion matrix")
    return _save(fig, out)


@rc_context(LITERAL_TEXT)
def plot_roc(
    y_true: np.ndarray, probs: np.ndarray, out: Path, title: str = "", classes: Sequence[str] = CLASSES
) -> Path:
    """One ROC curve per class present (class vs rest), AUC in the legend; melanoma drawn thickest."""
    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.add_subplot()
    for c, (dx, auc) in enumerate(zip(classes, one_vs_rest_auc(y_true, probs), strict=True)):
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(y_true == c, probs[:, c])
        ax.plot(fpr, tpr, lw=2.5 if dx == "mel" else 1.2, label=f"{dx} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.legend(loc="lower right")
    ax.set_title(title or "ROC, one class vs rest")
    return _save(fig, out)


@rc_context(LITERAL_TEXT)
def plot_reliability(y_true: np.ndarray, probs: np.ndarray, out: Path, title: str = "") -> Path:
    """Accuracy against top-1 confidence per bin (bars) beside the diagonal; a histogram underneath."""
    bins = reliability_bins(y_true, probs, ECE_BINS)
    edges = np.linspace(0, 1, ECE_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    width = 1 / ECE_BINS
    filled = bins["count"] > 0
    fig = Figure(figsize=(6, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.bar(centres[filled], bins["accuracy"][filled], width=width, edgecolor="black", label="accuracy")
    top.plot(
        centres[filled], bins["confidence"][filled], "o", color="red", label="mean confidence (gap = miscalibration)"
    )
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", framealpha=0.9)
    top.set_title(title or f"Reliability (ECE {expected_calibration_error(y_true, probs):.3f}, {ECE_BINS} bins)")
    bottom.bar(centres, bins["count"], width=width, edgecolor="black", color="grey")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("samples")
    return _save(fig, out)


def _save(fig: Figure, out: Path) -> Path:
    """Render on the Agg canvas, then write `out` atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    return atomic_write(out, lambda f: fig.savefig(f, dpi=110, format="png"))
