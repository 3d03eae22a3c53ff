"""The model card and the calibration a clinician's page relies on, computed on the validation split.

`calibrate` writes two files beside the checkpoint:

- ``ood.pt``: the statistics of an out-of-distribution score, loaded with ``weights_only=True``. The score
  is the Mahalanobis distance of an image's penultimate features to the nearest class mean, under one
  covariance shared by the classes (Lee et al. 2018), with means and covariance from the train split. Its
  threshold lets 95% of the validation images through. Measured on the demo model, scores from the logits
  (maximum softmax probability, energy) let many noise and flat-colour images through at that pass rate;
  the feature-space distance does not (docs/serve.md).
- ``model_card.json``: what the model is, what it was trained on, how well it did on validation and test,
  the risk thresholds on the malignant probability (mel + bcc + akiec) at the validation operating points
  of sensitivity 0.95 and 0.80, the OOD threshold, and its intended use and limitations, in words for a
  clinician.

`skinlesion serve` works without either file: the page then says that thresholds and metrics are missing.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from skinlesion import __version__, inference
from skinlesion.errors import UserError
from skinlesion.files import atomic_write
from skinlesion.labels import CLASSES, MALIGNANT, NAMES
from skinlesion.metrics import sensitivity_key

CARD = "model_card.json"
OOD = "ood.pt"
PASS_RATE = 0.95  # share of validation images the OOD threshold lets through
SENSITIVITIES = (0.95, 0.80)  # validation operating points that bound the risk bands

INTENDED_USE = (
    "Decision support for dermatologists and trained clinicians looking at a dermoscopic image of a single "
    "skin lesion: a ranking of 7 diagnostic categories (HAM10000's) with probabilities, and a malignancy "
    "risk band. It is not a diagnosis and does not replace examination, the patient's history, or "
    "histopathology."
)
LIMITATIONS = [
    "Dermoscopic images only: clinical (non-dermoscopic) photographs, other imaging and other body sites "
    "are outside what the model has seen, and its numbers for them mean nothing.",
    "Only the 7 HAM10000 categories (akiec, bcc, bkl, df, mel, nv, vasc): any other disease is forced into "
    "one of them.",
    "HAM10000 comes mostly from fair-skinned patients in Austria and Australia; performance on darker skin "
    "types and other populations is unknown and may be worse.",
    "The risk thresholds and metrics were measured on a validation split of the training data source, "
    "not on a prospective clinical population.",
    "A model trained on skinlesion's synthetic demo data has no clinical meaning at all.",
]


@dataclass(frozen=True)
class OODStats:
    """Class means [7, D], the shared precision matrix [D, D] and the score threshold."""

    means: torch.Tensor
    precision: torch.Tensor
    threshold: float

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each feature row [B, D] to its nearest class mean."""
        diff = features.double()[:, None, :] - self.means.double()[None]  # [B, 7, D]
        return torch.einsum("bcd,de,bce->bc", diff, self.precision.double(), diff).min(dim=1).values

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, val_features: torch.Tensor) -> OODStats:
        f, y = features.double(), labels.long()
        means = torch.stack([f[y == c].mean(0) if (y == c).any() else f.mean(0) for c in range(len(CLASSES))])
        centred = f - means[y]
        cov = centred.T @ centred / max(1, len(f) - 1)
        # Shrinkage keeps the inverse stable when features outnumber samples (512-2048 vs a few thousand).
        cov += torch.eye(cov.shape[0], dtype=cov.dtype) * (1e-2 * cov.diagonal().mean().clamp(min=1e-12))
        stats = cls(means=means, precision=torch.linalg.inv(cov), threshold=math.inf)
        threshold = float(torch.quantile(stats.scores(val_features), PASS_RATE))
        return cls(means=means.float(), precision=stats.precision.float(), threshold=threshold)

    def save(self, path: Path) -> None:
        payload = {"means": self.means, "precision": self.precision, "threshold": torch.tensor(self.threshold)}
        atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: Path, feature_dim: int) -> OODStats:
        """Read ood.pt with weights_only and check every shape before using it."""
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            means, precision, threshold = raw["means"], raw["precision"], float(raw["threshold"])
        except Exception as exc:  # unpickling refusal, missing key, wrong type: all mean "unusable"
            raise UserError(f"{path} is not a readable skinlesion OOD file ({exc}); rerun `skinlesion evaluate "
                            f"--split val` to rewrite it") from exc  # fmt: skip
        if tuple(means.shape) != (len(CLASSES), feature_dim) or tuple(precision.shape) != (feature_dim,) * 2:
            raise UserError(f"{path} does not fit this model (means {tuple(means.shape)}, features {feature_dim})")
        if not math.isfinite(threshold):
            raise UserError(f"{path}: threshold {threshold} is not finite")
        return cls(means=means.float(), precision=precision.float(), threshold=threshold)


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


def risk_band(malignant_probability: float, thresholds: dict[str, float | None]) -> str | None:
    """high (>= the 0.80-sensitivity point), elevated (>= the 0.95 point), low; None without thresholds."""
    high, elevated = thresholds.get("sensitivity_0.80"), thresholds.get("sensitivity_0.95")
    if high is None or elevated is None:
        return None
    if malignant_probability >= high:
        return "high"
    return "elevated" if malignant_probability >= elevated else "low"


def _pass(model: nn.Module, shards: Path, split: str, image_size: int, batch_size: int) -> dict[str, Any]:
    """Probabilities, features, labels and lesion ids of every sample of `split` (one process)."""
    from skinlesion.data.pipeline import eval_loader

    device = next(model.parameters()).device
    probs, feats, labels, lesions = [], [], [], []
    for batch in eval_loader(shards, split, image_size, batch_size, 0, 0, 1):
        out = inference.run(model, batch["image"].to(device))
        probs.append(out.probs.cpu())
        feats.append(out.features.cpu())
        labels.append(batch["label"])
        lesions += [m.get("lesion_id") for m in batch["meta"]]
    return {"probs": torch.cat(probs), "features": torch.cat(feats), "labels": torch.cat(labels), "lesions": lesions}


def calibrate(
    model: nn.Module, checkpoint: Path, shards: Path, image_size: int, arch: str, batch_size: int = 64,
    test_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write ood.pt and model_card.json beside `checkpoint`; return the card. Needs train and val samples."""
    from skinlesion.data.manifest import read_manifest
    from skinlesion.metrics import compute_metrics

    manifest = read_manifest(shards)
    for split in ("train", "val"):
        if not manifest["splits"].get(split, {}).get("samples"):
            raise UserError(f"{shards} has no {split} samples: the model card's calibration needs train and val")
    model.eval()
    train = _pass(model, shards, "train", image_size, batch_size)
    val = _pass(model, shards, "val", image_size, batch_size)
    ood = OODStats.fit(train["features"], train["labels"], val["features"])
    ood.save(checkpoint.parent / OOD)

    probs, labels = val["probs"].double().numpy(), val["labels"].numpy()
    groups = np.asarray(val["lesions"], dtype=object) if all(val["lesions"]) else None
    metrics = compute_metrics(labels, probs, groups=groups, n_bootstrap=1000)
    malignant_index = [CLASSES.index(dx) for dx in MALIGNANT]
    thresholds = risk_thresholds(probs[:, malignant_index].sum(1), np.isin(labels, malignant_index))
    card = {
        "checkpoint": checkpoint.name,
        "arch": arch,
        "image_size": image_size,
        "classes": [{"dx": dx, "name": NAMES[dx], "malignant": dx in MALIGNANT} for dx in CLASSES],
        "training_data": {
            "shards": str(shards),
            "rows": manifest.get("rows"),
            "rejected_by_reason": manifest.get("rejected_by_reason"),
            "class_counts": {s: info.get("class_counts") for s, info in manifest["splits"].items()},
        },
        "validation": _summary(metrics),
        "test": _summary(test_metrics) if test_metrics else None,
        "risk": {
            "malignant_classes": list(MALIGNANT),
            "thresholds": thresholds,
            "bands": {
                "high": "malignant probability at or above the validation operating point of sensitivity 0.80",
                "elevated": "between the operating points of sensitivity 0.95 and 0.80",
                "low": "below the operating point of sensitivity 0.95 (about 5% of malignant validation images)",
            },
        },
        "ood": {
            "score": "mahalanobis_min_class",
            "file": OOD,
            "threshold": ood.threshold,
            "validation_pass_rate": PASS_RATE,
        },
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
        "version": __version__,
        "date": dt.date.today().isoformat(),
    }
    atomic_write(checkpoint.parent / CARD, json.dumps(card, indent=2) + "\n")
    return card


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "n_samples": metrics["n_samples"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "balanced_accuracy_ci95": metrics["balanced_accuracy_ci95"],
        "melanoma_sensitivity_at_specificity_0.9": metrics["melanoma"][sensitivity_key(0.9)],
        "ece": metrics["ece"],
    }


def load_card(checkpoint: Path) -> dict[str, Any] | None:
    """model_card.json beside `checkpoint`, or None; a damaged one is an error naming it."""
    path = Path(checkpoint).parent / CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
        thresholds = card["risk"]["thresholds"]
        if not all(v is None or isinstance(v, int | float) for v in thresholds.values()):
            raise ValueError("risk thresholds are not numbers")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); rerun `skinlesion evaluate --split val` to rewrite it") from exc
    return card
