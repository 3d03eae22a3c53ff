"""The model card and the calibration a clinician's page relies on, computed on the validation split.

`calibrate` writes two files beside the checkpoint:

- ``ood.pt``: the statistics of the out-of-distribution check, loaded with ``weights_only=True``. An image
  is flagged when either (a) the Mahalanobis distance of its penultimate features to the nearest class mean,
  under one covariance shared by the classes (Lee et al. 2018, means and covariance from the train split),
  is large, or (b) the centre of the image, where a dermoscopic image has its lesion, has about the colour of
  its edges. The two thresholds together let 95% of the validation images through (`OODStats`). Measured on
  the demo model, scores from the logits (maximum softmax probability, energy) let many noise and flat-colour
  images through at that pass rate and the feature distance alone lets most plain skin through; the pair
  catches both (docs/serve.md).
- ``model_card.json``: what the model is, what it was trained on, how well it did on validation and test,
  the risk thresholds on the malignant probability (mel + bcc + akiec) at the validation operating points
  of sensitivity 0.95 and 0.80 (`risk`), the OOD threshold, and its intended use and limitations, in words for a
  clinician.

Both record the digest of the weights they were computed on (`card_trust.weights_digest`), and
`load_calibration`, which serve and predict read them through, uses them only for those weights, after checking
every value (`card_trust`). `skinlesion serve` works without either file, or with ones that belong to other
weights: the page then says that thresholds and metrics are missing, and why.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from skinlesion import __version__, inference
from skinlesion.card_trust import (
    DIGEST_KEY,
    card_classes,
    card_malignant,
    check_card,
    finite_float,
    reject_constant,
    weights_digest,
)
from skinlesion.data.datasets import HAM10000, Dataset, of_manifest
from skinlesion.errors import UserError
from skinlesion.files import atomic_write
from skinlesion.ood import OOD, PASS_RATE, OODStats
from skinlesion.risk import cutoff_problem, risk_thresholds

if TYPE_CHECKING:
    from skinlesion.model import LoadedModel

CARD = "model_card.json"


TITLES = {"ham10000": "HAM10000", "isic2019": "ISIC 2019", "isic2020": "ISIC 2020"}  # presets' names as written


def intended_use(dataset: Dataset) -> str:
    """What the card says the model is for, in the terms of the dataset it was trained on (and, for one with no
    malignant class, that it gives no malignant probability and no band: `report.NO_MALIGNANT`'s words)."""
    from skinlesion.report import NO_MALIGNANT  # report reads cards through this module: imported when called

    title = TITLES.get(dataset.name, dataset.name)
    band = ", and a malignancy risk band." if dataset.malignant else f". {NO_MALIGNANT}"
    return (
        "Decision support for dermatologists and trained clinicians looking at a dermoscopic image of a single "
        f"skin lesion: a ranking of the {len(dataset.codes)} diagnostic categories of {title} "
        f"({', '.join(dataset.codes)}) with probabilities{band} It is not a diagnosis and "
        "does not replace examination, the patient's history, or histopathology."
    )


def check_malignant(malignant: tuple[str, ...], dataset: Dataset, checkpoint: Path, shards: Path) -> None:
    """Refuse to measure risk cut-offs when the shards mark other classes malignant than the checkpoint does.

    predict and serve sum the checkpoint's malignant classes (they travel with it); cut-offs measured on the
    shards' sum would band that other number: an image with akiec 0.79 + bcc 0.13 got "High" against cut-offs
    on p(mel). One line naming both."""
    if set(malignant) != set(dataset.malignant):
        raise UserError(
            f"{checkpoint} marks {list(malignant) or 'no class'} malignant, and {shards}/manifest.json marks "
            f"{list(dataset.malignant) or 'no class'}: the risk cut-offs must be measured on the checkpoint's own "
            "malignant classes; calibrate it on shards prepared with the dataset description it was trained on"
        )


LIMITATIONS = [
    "Dermoscopic images only: clinical (non-dermoscopic) photographs, other imaging and other body sites "
    "are outside what the model has seen, and its numbers for them mean nothing.",
    "The risk thresholds and metrics were measured on a validation split of the training data source, "
    "not on a prospective clinical population.",
]


def training_source(manifest: dict[str, Any]) -> dict[str, Any]:
    """Where the training images came from: the manifest's ``source`` (`data.source.describe`), or kind
    "unknown" for shards prepared before skinlesion recorded it. Only kind "real" clears the page's banner."""
    source = manifest.get("source")
    if isinstance(source, dict) and source.get("kind") in ("synthetic", "mixed", "real"):
        return dict(source)
    return {
        "kind": "unknown",
        "synthetic": None,
        "dataset": None,
        "note": "the shards' manifest.json does not say where its images came from (prepared before "
        "skinlesion recorded it); rerun `skinlesion prepare` to record it",
    }


def limitations(source: dict[str, Any], described: Dataset | None = None) -> list[str]:
    """LIMITATIONS, led by what the training data means for this model: synthetic pictures, HAM10000's
    population, another dataset, or an unrecorded source."""
    kind, dataset = source.get("kind"), source.get("dataset")
    if kind == "synthetic":
        first = (
            "Trained only on synthetic pictures (skinlesion synth), not on photographs of patients: every "
            "metric here describes synthetic images, and the model has no clinical meaning at all."
        )
    elif kind == "mixed":
        first = (
            f"Trained partly on synthetic pictures ({source.get('synthetic_images')} of "
            f"{source.get('images')} images): its metrics mix synthetic and real images and do not "
            "describe real lesions."
        )
    elif kind == "real" and dataset == "HAM10000":
        first = (
            "HAM10000 comes mostly from fair-skinned patients in Austria and Australia; performance on "
            "darker skin types and other populations is unknown and may be worse."
        )
    elif kind == "real":
        first = f"Trained on {dataset}: performance on other populations and cameras is unknown and may be worse."
    else:
        first = (
            "Where the training images came from was not recorded: treat the model as not validated on real dermoscopy."
        )
    described = described or HAM10000  # the model's classes: shards without a description are HAM10000's
    classes = (
        f"Only the {len(described.codes)} {TITLES.get(described.name, described.name)} categories "
        f"({', '.join(described.codes)}): any other "
        "disease is forced into one of them."
    )
    return [first, LIMITATIONS[0], classes, *LIMITATIONS[1:]]


def _pass(
    model: nn.Module, shards: Path, split: str, image_size: int, batch_size: int, manifest: dict[str, Any]
) -> dict[str, Any]:
    """Probabilities, features, centre contrasts, labels and lesion ids of every sample of `split` (one process)."""
    from skinlesion.data.pipeline import eval_loader

    device = next(model.parameters()).device
    probs, feats, contrast, labels, lesions, metas = [], [], [], [], [], []
    for batch in eval_loader(shards, split, image_size, batch_size, 0, 0, 1, manifest=manifest):
        out = inference.run(model, batch["image"].to(device))
        probs.append(out.probs.cpu())
        feats.append(out.features.cpu())
        contrast.append(out.contrast.cpu())
        labels.append(batch["label"])
        lesions += [m.get("lesion_id") for m in batch["meta"]]
        metas += batch["meta"]
    return {
        "probs": torch.cat(probs),
        "features": torch.cat(feats),
        "contrast": torch.cat(contrast),
        "labels": torch.cat(labels),
        "lesions": lesions,
        "metas": metas,
    }


def calibrate(
    model: nn.Module,
    checkpoint: Path,
    shards: Path,
    image_size: int,
    arch: str,
    batch_size: int = 64,
    test_metrics: dict[str, Any] | None = None,
    manifest: dict[str, Any] | None = None,
    malignant: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Write ood.pt and model_card.json beside `checkpoint`; return the card. Needs train and val samples.
    The trainer passes the `manifest` it read at start. Both files record the digest of `model`'s weights,
    the ones measured here, whatever `checkpoint` holds by then. `malignant`: the checkpoint's malignant classes
    (`LoadedModel.malignant`), the sum the cut-offs are measured on; shards that mark others are refused
    (`check_malignant`). None: the shards' (a caller that built the model from them)."""
    from skinlesion.data.manifest import read_manifest, ungrouped_note
    from skinlesion.metrics import compute_metrics, selection
    from skinlesion.subgroups import limitation_lines, subgroup_metrics

    manifest = manifest or read_manifest(shards)
    for split in ("train", "val"):
        if not manifest["splits"].get(split, {}).get("samples"):
            raise UserError(f"{shards} has no {split} samples: the model card's calibration needs train and val")
    source = training_source(manifest)
    dataset = of_manifest(manifest, f"{shards}/manifest.json")  # classes, names and malignant ones
    malignant = dataset.malignant if malignant is None else tuple(malignant)
    check_malignant(malignant, dataset, checkpoint, shards)
    model.eval()
    digest = weights_digest(model)
    train = _pass(model, shards, "train", image_size, batch_size, manifest)
    val = _pass(model, shards, "val", image_size, batch_size, manifest)
    val_outputs = inference.Outputs(probs=val["probs"], features=val["features"], contrast=val["contrast"])
    ood = replace(OODStats.fit(train["features"], train["labels"], val_outputs, len(dataset.codes)), weights=digest)
    ood.save(checkpoint.parent / OOD)

    probs, labels = val["probs"].double().numpy(), val["labels"].numpy()
    groups = np.asarray(val["lesions"], dtype=object) if all(val["lesions"]) else None
    metrics = compute_metrics(
        labels, probs, groups=groups, n_bootstrap=1000, classes=dataset.codes, malignant=malignant
    )
    # Subgroup numbers for LIMITATIONS: the test split's when the trainer evaluated it, else validation's.
    split, subgroups = "test", (test_metrics or {}).get("subgroups")
    if subgroups is None:
        split = "validation"
        subgroups = subgroup_metrics(labels, probs, val["metas"], dataset.codes, groups, malignant=malignant)
    malignant_index = [dataset.codes.index(dx) for dx in malignant]
    p_malignant, is_malignant = probs[:, malignant_index].sum(1), np.isin(labels, malignant_index)
    measured = risk_thresholds(p_malignant, is_malignant)
    problem = cutoff_problem(p_malignant, is_malignant, measured) if malignant_index else None
    thresholds = dict.fromkeys(measured) if problem else measured  # no band from cut-offs that separate nothing
    card = {
        "checkpoint": checkpoint.name,
        "arch": arch,
        "image_size": image_size,
        DIGEST_KEY: digest,
        "dataset": dataset.name,
        "classes": [{"dx": c.code, "name": c.name, "malignant": c.code in malignant} for c in dataset.classes],
        "training_data": {
            "shards": str(shards),
            "rows": manifest.get("rows"),
            "rejected_by_reason": manifest.get("rejected_by_reason"),
            "class_counts": {s: info.get("class_counts") for s, info in manifest["splits"].items()},
            "source": source,
            "splits": split_counts(manifest, dataset),
        },
        "validation": _summary(metrics),
        "best_pt_selection": selection(metrics),  # the validation metric training keeps best.pt by
        "test": _summary(test_metrics) if test_metrics else None,
        "risk": {
            "malignant_classes": [c for c in dataset.codes if c in malignant],  # head order, as check_card reads
            "thresholds": thresholds,
            "measured_thresholds": measured,  # as validation gave them, also when they cannot be used
            "problem": problem,
            "bands": {
                "high": "malignant probability at or above the validation operating point of sensitivity 0.80",
                "elevated": "between the operating points of sensitivity 0.95 and 0.80",
                "below_cutoffs": "below the operating point of sensitivity 0.95 (up to 5% of malignant validation "
                "images fell there): not a low risk",
            },
        },
        "ood": {
            "score": "max(mahalanobis_min_class / distance_threshold, contrast_threshold / centre_contrast)",
            "file": OOD,
            "threshold": ood.threshold,
            "distance_threshold": ood.distance_threshold,
            "contrast_threshold": ood.contrast_threshold,
            "validation_pass_rate": PASS_RATE,
        },
        "intended_use": intended_use(dataset),
        "limitations": limitations(source, dataset) + ungrouped_note(manifest) + limitation_lines(subgroups, split),
        "subgroups": {"split": split, "metrics": subgroups},
        "version": __version__,
        "date": dt.date.today().isoformat(),
    }
    atomic_write(checkpoint.parent / CARD, json.dumps(card, indent=2) + "\n")
    return card


def split_counts(manifest: dict[str, Any], dataset: Dataset) -> dict[str, dict[str, Any]]:
    """What each split held, in the dataset's unit: {split: {images, groups, unit, samples}}.

    ``images`` and ``groups`` are the distinct images and groups (lesions; patients for ISIC 2020) of the split,
    before the train split's balancing repeats some; ``samples`` counts its shard samples, repeats included. The
    card says "trained on" the train split's, not the dataset's total (which counted validation and test too).
    """
    from skinlesion.data.source import group_unit

    unit = group_unit(dataset.group_column)
    out = {}
    for split, info in manifest["splits"].items():
        out[split] = {
            "images": info.get("images"),
            "groups": info.get("lesions"),
            "unit": unit,
            "samples": info.get("samples"),
        }
    return out


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    from skinlesion.metrics import sensitivity_key  # scikit-learn: 1 s of start-up that serve and predict skip

    binary = metrics.get("binary") or {}
    return {
        "n_samples": metrics["n_samples"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "balanced_accuracy_ci95": metrics["balanced_accuracy_ci95"],
        **({"balanced_accuracy_ci95_note": note} if (note := metrics.get("balanced_accuracy_ci95_note")) else {}),
        "melanoma_sensitivity_at_specificity_0.9": metrics["melanoma"][sensitivity_key(0.9)],
        "ece": metrics["ece"],
        # A binary task's own figures: the AUC keeps best.pt and ranks a sweep's runs (`leaderboard`); its positive
        # class may be other than `mel` (a custom dataset's "malignant"), whose melanoma figure above is then null.
        **(
            {
                "auc": binary["auc"],
                "auc_ci95": binary["auc_ci95"],
                "positive": binary["positive"],
                "positive_sensitivity_at_specificity_0.9": binary[sensitivity_key(0.9)],
            }
            if binary.get("positive") is not None
            else {}
        ),
    }


def load_card(checkpoint: Path) -> dict[str, Any] | None:
    """model_card.json beside `checkpoint`, every value checked (`card_trust.check_card`), or None when there is
    none; a damaged or out-of-range one is a one-line error naming it and the key at fault. Whether it belongs
    to the weights in hand is `load_calibration`'s question."""
    path = Path(checkpoint).parent / CARD
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        return check_card(json.loads(text, parse_constant=reject_constant, parse_float=finite_float))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); rerun `skinlesion evaluate --split val` to rewrite it") from exc


@dataclass(frozen=True)
class Calibration:
    """The card and OOD statistics that belong to a model's weights, or None and why (`problem`, for the page)."""

    card: dict[str, Any] | None
    ood: OODStats | None
    problem: str | None
    weights: str  # the digest of the model's weights, whether or not a card matched them


def load_calibration(loaded: LoadedModel, digest: str | None = None) -> Calibration:
    """model_card.json and ood.pt beside `loaded.source`, if they were computed on these very weights.

    A card for other weights (a newer best.pt copied in, a resumed run replaced best.pt and stopped before
    writing its card, an older best.pt evaluated since), or one written before cards recorded their weights,
    is ignored, and `problem` says so: its cut-offs and OOD statistics would mislead (with the epoch-2 weights
    beside the epoch-3 card, 21 of 60 ordinary images were flagged out-of-distribution instead of 2).
    A damaged card or ood.pt, or one with a value out of range, is a UserError. `digest` saves recomputing it.
    """
    checkpoint = Path(loaded.source)
    digest = digest or weights_digest(loaded.model)
    rewrite = f"rerun `skinlesion evaluate --checkpoint {checkpoint} --shards SHARDS --split val` to write one"
    card = load_card(checkpoint)
    if card is None:
        return Calibration(None, None, f"no {CARD} beside the checkpoint: {rewrite}", digest)
    if (card["arch"], card["image_size"]) != (loaded.arch, loaded.image_size):
        why = f"{CARD} describes a {card['arch']} at {card['image_size']} px, not this checkpoint"
        return Calibration(None, None, f"{why}; {rewrite}", digest)
    if card_classes(card) != list(loaded.classes):
        why = f"{CARD} describes the classes {card_classes(card)}, not this checkpoint's {list(loaded.classes)}"
        return Calibration(None, None, f"{why}; {rewrite}", digest)
    if set(card_malignant(card)) != set(loaded.malignant):
        why = (
            f"{CARD} measured its risk cut-offs on the malignant classes {card_malignant(card)}, and this "
            f"checkpoint's are {list(loaded.malignant)}: they do not apply to its malignant probability"
        )
        return Calibration(None, None, f"{why}; {rewrite}", digest)
    recorded = card.get(DIGEST_KEY)
    if recorded is None:
        why = f"{CARD} records no weights digest (an older skinlesion wrote it), so it cannot be matched to them"
        return Calibration(None, None, f"{why}; {rewrite}", digest)
    if recorded != digest:
        why = (
            f"{CARD} was computed on other weights than {checkpoint.name} (sha256 {recorded[:12]}, these are "
            f"{digest[:12]}): its risk cut-offs and out-of-distribution check do not apply to them"
        )
        return Calibration(None, None, f"{why}; {rewrite}", digest)
    ood = OODStats.load(checkpoint.parent / OOD, loaded.model.fc.in_features)
    if ood.weights != digest or ood.means.shape[0] != len(loaded.classes):
        why = f"{OOD} was computed on other weights than {CARD} and {checkpoint.name}"
        return Calibration(None, None, f"{why}; {rewrite}", digest)
    stated = (card["ood"]["distance_threshold"], card["ood"]["contrast_threshold"])
    used = (ood.distance_threshold, ood.contrast_threshold)
    if not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(stated, used, strict=True)):
        why = f"{OOD}'s thresholds differ from those {CARD} states (they come from two calibrations)"
        return Calibration(None, None, f"{why}; {rewrite}", digest)
    return Calibration(card, ood, None, digest)
