"""The out-of-distribution statistics behind the page's "unfamiliar image" notice: ood.pt.

Fitted by `card.calibrate` on the train and validation splits of the checkpoint it describes, read by serve,
predict and evaluate through `card.load_calibration`, which uses them only with the weights they were fitted on.
Apart from the model card because it is its own concern: two checks on the model's features and input, their
thresholds, and a file format that is loaded with ``weights_only=True`` and checked value by value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from skinlesion import inference
from skinlesion.card_trust import DIGEST_KEY, check_ood_tensors, is_digest
from skinlesion.errors import UserError
from skinlesion.files import atomic_write

OOD = "ood.pt"
PASS_RATE = 0.95  # share of validation images the OOD threshold lets through


@dataclass(frozen=True)
class OODStats:
    """Two checks, either of which flags an image, with thresholds that together let PASS_RATE of validation through.

    - Distance: the squared Mahalanobis distance of the penultimate features to the nearest class mean, under
      one covariance shared by the classes (Lee et al. 2018): class means [7, D] and precision [D, D] from the
      train split. It catches what looks like no training image at all (noise, flat colour, gradients).
    - Centre contrast (`inference.centre_contrast`): a dermoscopic image is centred on a lesion whose colour
      differs from the skin around it. Skin with no lesion is the near miss the distance cannot see: the
      classifier's features only need to tell the 7 classes apart, and "no visible lesion" sits close to a
      small pale class (docs/serve.md). A contrast below its threshold flags the image.

    Each check flags the same share of validation images (its own tail), chosen so that together they flag
    1 - PASS_RATE of them. `scores` puts both on one scale: the larger of distance / its threshold and
    contrast threshold / contrast, so an image is flagged when its score exceeds THRESHOLD = 1.

    `weights` is the digest of the model whose features these are (`card_trust.weights_digest`).
    """

    means: torch.Tensor
    precision: torch.Tensor
    distance_threshold: float
    contrast_threshold: float
    weights: str | None = None
    threshold: ClassVar[float] = 1.0
    # ood.pt layout: 1 (one Mahalanobis threshold) predates the contrast check, 2 the weights digest.
    FORMAT: ClassVar[int] = 3

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each feature row [B, D] to its nearest class mean."""
        diff = features.double().cpu()[:, None, :] - self.means.double()[None]  # [B, 7, D]
        return torch.einsum("bcd,de,bce->bc", diff, self.precision.double(), diff).min(dim=1).values

    def scores(self, outputs: inference.Outputs) -> torch.Tensor:
        """[B] max(distance / its threshold, contrast threshold / contrast); above 1 means flagged.

        The contrast ratio is capped at 1000 so that a flat image (contrast 0) gets a finite, JSON-able score;
        a contrast threshold of 0 (no validation image below any contrast) then gives 0, not 0 / 0.
        """
        by_distance = self.distances(outputs.features) / self.distance_threshold
        contrast = outputs.contrast.double().cpu().clamp(min=max(self.contrast_threshold / 1000, 1e-12))
        return torch.maximum(by_distance, self.contrast_threshold / contrast)

    @classmethod
    def fit(
        cls, features: torch.Tensor, labels: torch.Tensor, val: inference.Outputs, n_classes: int | None = None
    ) -> OODStats:
        """Means (one per class of the head: `n_classes`, else up to the largest label) and covariance from the
        train features; thresholds from the validation outputs."""
        f, y = features.double(), labels.long()
        n_classes = n_classes or int(y.max()) + 1
        means = torch.stack([f[y == c].mean(0) if (y == c).any() else f.mean(0) for c in range(n_classes)])
        centred = f - means[y]
        cov = centred.T @ centred / max(1, len(f) - 1)
        # Shrinkage keeps the inverse stable when features outnumber samples (512-2048 vs a few thousand).
        cov += torch.eye(cov.shape[0], dtype=cov.dtype) * (1e-2 * cov.diagonal().mean().clamp(min=1e-12))
        unfitted = cls(means=means, precision=torch.linalg.inv(cov), distance_threshold=1.0, contrast_threshold=0.0)
        distance, contrast = unfitted.distances(val.features), val.contrast.double().cpu()
        # The largest per-check tail share whose union still flags at most 1 - PASS_RATE of validation
        # (about half of it each when the checks rarely agree, all of it when they always do).
        budget, share = 1 - PASS_RATE, 0.0
        for candidate in torch.linspace(0, 1 - PASS_RATE, 201, dtype=torch.float64)[1:]:
            high, low = torch.quantile(distance, 1 - candidate), torch.quantile(contrast, candidate)
            if float(((distance > high) | (contrast < low)).double().mean()) > budget + 1e-12:
                break
            share = float(candidate)
        return cls(
            means=means.float(),
            precision=unfitted.precision.float(),
            distance_threshold=float(torch.quantile(distance, 1 - share)),
            contrast_threshold=float(torch.quantile(contrast, share)),
        )

    def save(self, path: Path) -> None:
        if not is_digest(self.weights):
            raise ValueError("OODStats.weights must be the digest of the model they describe before saving")
        payload = {
            "format": torch.tensor(self.FORMAT),
            DIGEST_KEY: self.weights,
            "means": self.means,
            "precision": self.precision,
            "distance_threshold": torch.tensor(self.distance_threshold, dtype=torch.float64),
            "contrast_threshold": torch.tensor(self.contrast_threshold, dtype=torch.float64),
        }
        atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: Path, feature_dim: int) -> OODStats:
        """Read ood.pt with weights_only and check its format, digest, every shape and value before use.

        Whether the digest is that of the model in hand is `load_calibration`'s question."""
        rewrite = (
            f"rewrite it with `skinlesion evaluate --checkpoint {path.parent}/best.pt --shards SHARDS --split "
            "val` (SHARDS: the folder the model was trained on)"
        )
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            found = int(raw.get("format", 1))
            if found != cls.FORMAT:
                raise UserError(
                    f"{path} was written by an older skinlesion (ood.pt format {found}; this one reads {cls.FORMAT}, "
                    f"with the centre-contrast check and the weights digest); {rewrite}"
                )
            means, precision, weights = raw["means"], raw["precision"], raw[DIGEST_KEY]
            distance, contrast = float(raw["distance_threshold"]), float(raw["contrast_threshold"])
        except UserError:
            raise
        except Exception as exc:  # unpickling refusal, missing key, wrong type: all mean "unusable"
            raise UserError(f"{path} is not a readable skinlesion OOD file ({exc}); {rewrite}") from exc
        if not is_digest(weights):
            raise UserError(f"{path}: {DIGEST_KEY} is not a sha256 digest; {rewrite}")
        check_ood_tensors(means, precision, feature_dim, path)
        if not (math.isfinite(distance) and distance > 0 and math.isfinite(contrast) and contrast >= 0):
            raise UserError(f"{path}: thresholds {distance}, {contrast} are not a positive distance and contrast")
        return cls(
            means=means.float(),
            precision=precision.float(),
            distance_threshold=distance,
            contrast_threshold=contrast,
            weights=weights,
        )
