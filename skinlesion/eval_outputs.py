"""What an evaluation leaves for its reader: the files in its output folder and the lines printed after it.

`evaluate.evaluate` computes; this module only renders what it computed: metrics.json, predictions.csv (the
dataset's ISIC layout, `submission`), ood.csv, classification_report.txt and the three plots, and the summary a
user reads in the terminal (`EvalResult.summary`). Kept apart so that the distributed prediction and the metrics
read on one screen, and so that a change of wording or of a file's layout touches no code that every rank runs.
Only the main process calls `write_outputs`, each file written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import classification_report

from skinlesion.data.datasets import HAM10000, Dataset
from skinlesion.files import atomic_write
from skinlesion.metrics import NOT_ESTIMABLE, SPECIFICITIES, sensitivity_key
from skinlesion.plots import plot_confusion_matrix, plot_reliability, plot_roc
from skinlesion.subgroups import subgroup_lines
from skinlesion.submission import isic_csv, ood_csv

if TYPE_CHECKING:
    from skinlesion.evaluate import Predictions


def write_outputs(
    out: Path, preds: Predictions, metrics: dict[str, Any], plots: bool = True, dataset: Dataset = HAM10000
) -> dict[str, Path]:
    """metrics.json, predictions.csv (the dataset's ISIC format, nothing more), ood.csv (with OOD scores),
    classification_report.txt and the three plots."""
    out.mkdir(parents=True, exist_ok=True)
    title = f"{metrics.get('split')} split, n={metrics['n_samples']}"
    files = {
        "metrics": _write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n"),
        "predictions": _write_text(out / "predictions.csv", isic_csv(preds, dataset)),
    }
    ood = ood_csv(preds)
    if ood is not None:
        files["ood"] = _write_text(out / "ood.csv", ood)
    else:  # an earlier evaluation's ood.csv in this folder would pair other scores with these predictions
        (out / "ood.csv").unlink(missing_ok=True)
    files["report"] = _write_text(out / "classification_report.txt", _report(preds, metrics))
    if plots:
        cm = np.asarray(metrics["confusion_matrix"])
        files["confusion_matrix"] = plot_confusion_matrix(
            cm, out / "confusion_matrix.png", f"Confusion matrix, {title}", metrics["classes"]
        )
        files["roc"] = plot_roc(
            preds.labels, preds.probs, out / "roc.png", f"ROC one vs rest, {title}", metrics["classes"]
        )
        files["reliability"] = plot_reliability(preds.labels, preds.probs, out / "reliability.png")
    return files


def _report(preds: Predictions, metrics: dict[str, Any]) -> str:
    """scikit-learn's classification report (as in the seed notebook) under a header naming the run."""
    report = classification_report(
        preds.labels,
        preds.probs.argmax(axis=1),
        labels=list(range(len(metrics["classes"]))),
        target_names=list(metrics["classes"]),
        digits=3,
        zero_division=0,
    )
    return f"checkpoint: {metrics.get('checkpoint')}\nsplit: {metrics.get('split')}\n\n{report}"


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, text)


def summary_text(metrics: dict[str, Any], files: dict[str, Path]) -> str:
    """The few lines a user reads after an evaluation: balanced accuracy with its CI, recalls, melanoma."""
    m, mel = metrics, metrics["melanoma"]

    def num(value: float | None, fmt: str = ".3f") -> str:
        return "n/a" if value is None else format(value, fmt)

    low, high = m["balanced_accuracy_ci95"]
    ci_note = "  (95% CI not estimable: every bootstrap resample gave the same value)"
    group = {"lesion_id": "lesions", "patient_id": "patients"}.get(m.get("group_key", "lesion_id"), "groups")
    unit = group if m.get("bootstrap", {}).get("unit") == "group" else "images"
    at_spec = ", ".join(f"{num(mel[sensitivity_key(spec)])} at specificity {spec:g}" for spec in SPECIFICITIES)
    lines = [
        f"{m.get('split')} split: {m['n_samples']} images, checkpoint {m.get('checkpoint')}"
        + (", TTA x8" if m.get("tta") else ""),
        f"  balanced accuracy {num(m['balanced_accuracy'])}"
        + (f"  (95% CI {num(low)}-{num(high)}, bootstrap over {unit})" if low is not None else "")
        + (ci_note if m.get("balanced_accuracy_ci95_note") == NOT_ESTIMABLE else ""),
        f"  accuracy {num(m['accuracy'])}   AUC macro {num(m['auc_macro'])}   ECE {num(m['ece'])}",
        "  recall    " + "  ".join(f"{dx} {num(v['recall'], '.2f')}" for dx, v in m["per_class"].items()),
        "  support   " + "  ".join(f"{dx} {v['support']}" for dx, v in m["per_class"].items()),
        f"  melanoma  sensitivity {num(mel['sensitivity_at_argmax'])} (argmax), {at_spec}; AUC {num(mel['auc'])}",
    ]
    b = m.get("binary")
    if b and b.get("positive") is None:  # two classes, but no single malignant one to score
        lines.append(f"  binary    {b['note']}")
    elif b:  # ISIC 2020: melanoma against the rest
        lo, hi = b["auc_ci95"]
        ci = f"95% CI {num(lo)}-{num(hi)}, over {unit}" if lo is not None else "95% CI not estimable"
        lines.append(
            f"  binary    {b['positive']} AUC {num(b['auc'])} ({ci}), "
            f"partial AUC above 80% sensitivity {num(b['partial_auc_above_sensitivity_0.8'])}"
        )
    chosen = m.get("selection")
    if chosen:
        lines.append(f"  best.pt   kept by the {chosen['keeps']} {chosen['metric']}")
        if chosen["note"]:
            lines.append(f"  warning: {chosen['note']}")
    lines += subgroup_lines(m.get("subgroups") or {})
    lines += [f"  note: {note}" for note in m.get("split_notes") or []]
    if files:
        folder = next(iter(files.values())).parent
        lines.append(f"  wrote {folder}/: " + ", ".join(p.name for p in files.values()))
    return "\n".join(lines)
