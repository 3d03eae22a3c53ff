"""What one image's result tells a clinician, worded once for the page, `skinlesion predict`'s text and its JSON.

The page (`skinlesion serve`) and `predict` load the same model card and OOD statistics (`Calibration.load`),
judge each image the same way (`Calibration.judge`) and show the same words: the risk band's label and its
one-line meaning, the out-of-distribution notice, the banner of a model not trained on real dermoscopy, and
whole percents (`percent`). The page's JavaScript shows the strings this module puts into the JSON and rounds
with the same rule, so a dermatologist who checks an image on the command line reads what the page said.

Two rules a careful clinical reader expects:
- No band for an image flagged as out-of-distribution: the band's cut-offs were measured on validation images
  the model knows, and mean nothing for one it does not. ``risk`` is null there, in the JSON too.
- No reassuring wording: below both cut-offs is "below the cut-offs", not "low risk", because up to 5% of the
  malignant validation lesions scored that low.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from skinlesion import inference
from skinlesion.card import load_calibration
from skinlesion.ood import OODStats
from skinlesion.risk import risk_band

if TYPE_CHECKING:
    from skinlesion.model import LoadedModel

BAND_LABELS = {"high": "High", "elevated": "Elevated", "below_cutoffs": "Below the cut-offs"}
OOD_NOTICE = (
    "This image looks unlike the dermoscopic images the model was trained on. Its suggestions are not reliable "
    "here (not dermoscopy, no lesion in the centre, another disease, or a poor image)."
)
NO_BAND_OOD = "No risk band: the band's cut-offs mean nothing for an image unlike the model's training images."
SYNTHETIC_BANNER = (
    "Demonstration model: trained on synthetic pictures, not on dermoscopy of patients. Its numbers have no "
    "clinical meaning, and its validation and test scores describe synthetic images only."
)
UNKNOWN_SOURCE_BANNER = (
    "Unverified model: no model card for these weights says that it was trained on real dermoscopy. Treat its "
    "numbers as having no clinical meaning."
)


def percent(p: float) -> str:
    """A probability as a whole percent: "<1%" below 0.01, ">99%" above 0.99, else rounded half up.

    The page's JavaScript applies the same rule (`pct` in static/index.html): both compute floor(100 p + 0.5)
    on the same double, so they agree digit for digit. Full precision stays in the JSON.
    """
    if p < 0.01:
        return "<1%"
    if p > 0.99:
        return ">99%"
    return f"{math.floor(100 * p + 0.5)}%"


def band_note(band: str, thresholds: dict[str, float | None]) -> str:
    """One line that says where a malignant probability lies against this model's two cut-offs.

    Every percent in it is labelled as what it is: the cut-offs are malignant probabilities, and the share of
    malignant validation lesions each one caught is a sensitivity, said in words beside it. ("below the 80%
    cut-off, 90%" put a sensitivity and a probability side by side, and read as either.)"""
    at95, at80 = percent(thresholds["sensitivity_0.95"] or 0.0), percent(thresholds["sensitivity_0.80"] or 0.0)
    cutoffs = (
        f"Cut-offs on the malignant probability: {at80} for High (it caught 80% of the malignant validation "
        f"lesions), {at95} for Elevated (it caught 95% of them)."
    )
    if band == "high":
        return f"At or above the High cut-off. {cutoffs}"
    if band == "elevated":
        return f"At or above the Elevated cut-off and under the High one. {cutoffs}"
    return (
        f"Under both cut-offs. {cutoffs} Not a benign finding: up to 5% of the malignant validation lesions "
        "scored this low."
    )


def no_band_note(card: dict[str, Any] | None) -> str:
    """Why an image that is not flagged gets no risk band: the card's cut-offs cannot separate anything (it says
    why: `risk.cutoff_problem`), or there are no cut-offs. Never a threshold worded as one ("below >99%")."""
    problem = ((card or {}).get("risk") or {}).get("problem")
    if problem:
        return f"No risk band: the cut-offs from validation cannot separate malignant from other lesions ({problem})."
    return "No risk band: this model has no calibrated cut-offs."


NO_MALIGNANT = "This model has no malignant class: no malignant probability, no risk band."


def malignant_note(labels: inference.Labels) -> str | None:
    """`NO_MALIGNANT` for a model whose classes include no malignant one (a custom dataset whose spec marks none,
    say a benign-only classifier), else None. The page, predict's text and JSON and the model card say it in
    these words, and show no malignant line and no band: a sum over no class is no probability."""
    return None if labels.malignant else NO_MALIGNANT


def banner(card: dict[str, Any] | None) -> str | None:
    """The warning shown above every result unless the card says the model was trained on real images."""
    if card is None:  # no card (or one of other weights): nothing says where its training images came from
        return UNKNOWN_SOURCE_BANNER
    source = (card.get("training_data") or {}).get("source") or {}
    if source.get("kind") == "real":
        return None
    return SYNTHETIC_BANNER if source.get("synthetic") else UNKNOWN_SOURCE_BANNER


@dataclass(frozen=True)
class Calibration:
    """The model card and OOD statistics beside a checkpoint, or why there are none (`problem`)."""

    card: dict[str, Any] | None
    ood: OODStats | None
    problem: str | None
    weights: str | None = None  # the sha256 of the weights in hand, whether or not a card matched them
    labels: inference.Labels = inference.HAM10000_LABELS  # the model's classes, names and malignant ones

    @classmethod
    def load(cls, checkpoint: Path, loaded: LoadedModel) -> Calibration:
        """model_card.json and ood.pt beside `checkpoint` (loaded as `loaded`) when they were computed on these
        very weights (`card.load_calibration`: matched by the weights' digest, every value checked); a damaged
        file is a UserError."""
        found = load_calibration(loaded)
        labels = inference.Labels.of(loaded.classes, loaded.malignant, found.card)
        return cls(found.card, found.ood, found.problem, found.weights, labels)

    @property
    def thresholds(self) -> dict[str, float | None]:
        return self.card["risk"]["thresholds"] if self.card else {}

    @property
    def banner(self) -> str | None:
        return banner(self.card)

    @property
    def malignant_note(self) -> str | None:
        return malignant_note(self.labels)

    def scores(self, outputs: inference.Outputs) -> list[float | None]:
        """The OOD score of each image of a batch (None each without ood.pt)."""
        return self.ood.scores(outputs).tolist() if self.ood else [None] * len(outputs.probs)

    def judge(self, probs: torch.Tensor, score: float | None, top_k: int = 3) -> dict[str, Any]:
        """One image's entry: predictions and malignant probability (full precision, and as shown: ``percent``,
        ``malignant_percent``), ``risk`` (a band, or null without thresholds or when flagged), ``risk_label`` and
        ``risk_note`` (the words shown), ``ood`` {flag, score, threshold} (null without ood.pt) and ``notice``
        (the OOD notice, or null)."""
        entry = inference.describe(probs, top_k, self.labels)
        for prediction in entry["predictions"]:
            prediction["percent"] = percent(prediction["probability"])
        malignant = entry["malignant_probability"]  # None: the model has no malignant class
        entry["malignant_percent"] = None if malignant is None else percent(malignant)
        flagged = self.ood is not None and score is not None and score > self.ood.threshold
        entry["ood"] = {"flag": flagged, "score": score, "threshold": self.ood.threshold} if self.ood else None
        band = None if flagged or malignant is None else risk_band(malignant, self.thresholds)
        entry["risk"] = band
        entry["risk_label"] = BAND_LABELS[band] if band else None
        if band:
            entry["risk_note"] = band_note(band, self.thresholds)
        elif malignant is None:
            entry["risk_note"] = NO_MALIGNANT
        else:
            entry["risk_note"] = NO_BAND_OOD if flagged else no_band_note(self.card)
        entry["notice"] = OOD_NOTICE if flagged else None
        return entry
