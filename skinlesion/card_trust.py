"""Whether a model card may be believed: the digest that ties it to the weights, and a check of every value.

`skinlesion.card` writes ``model_card.json`` and ``ood.pt`` and reads them back through these checks, which
serve and predict rely on:

- `weights_digest`: the sha256 of the model's state_dict tensors. The card and ood.pt record the digest of the
  weights they were computed on, and a reader computes it again from the weights it loaded. The tensors, not the
  file's bytes, because (a) what the card describes is the weights: best.pt's epoch and metric fields, or the
  model.pt export of the same weights, do not change a single probability; (b) `calibrate` receives a model, so
  it hashes exactly the weights it measured, with no window in which best.pt can be replaced between loading
  and hashing (a resumed run does that); (c) it costs one pass over the weights, about 0.2 s for a ResNet-50.
- `check_card`: every number finite and in its range, every structure of the type its reader expects. A card
  with NaN cut-offs put a malignant probability of 0.947 in the "low" band, and one whose thresholds were a
  list stopped serve with a traceback.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from skinlesion.control_chars import control_character
from skinlesion.errors import UserError
from skinlesion.labels import CLASSES, MALIGNANT  # the defaults of a card that predates dataset descriptions

DIGEST_KEY = "weights_sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_UNIT = (0.0, 1.0)  # probabilities, rates, accuracies
_METRICS = ("balanced_accuracy", "melanoma_sensitivity_at_specificity_0.9", "ece")


def weights_digest(model: nn.Module) -> str:
    """sha256 over the model's state_dict: each tensor's name, dtype, shape and bytes, in name order.

    Parameters and buffers (batch-norm statistics change the outputs too); the layout in memory (device,
    channels_last) does not matter, only the values.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{values.dtype}\0{tuple(values.shape)}\0".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def is_digest(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def reject_constant(name: str) -> float:
    """`json.loads(parse_constant=...)`: NaN and Infinity are not JSON, and no card value may be either."""
    raise ValueError(f"{name} is not a finite number")


def finite_float(text: str) -> float:
    """`json.loads(parse_float=...)`: 1e999 parses to infinity, which is no more a card value than NaN."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _number(value: Any, key: str, low: float, high: float = math.inf, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} is {value!r}, not a number")
    if not low <= value <= high:
        raise ValueError(f"{key}={value!r} is outside [{low:g}, {high:g}]")


def _count(value: Any, key: str, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} is {value!r}, not a count")


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{key} is a {type(value).__name__}, not an object")
    return value


def _check_summary(summary: Any, key: str, classes: list[str]) -> None:
    """The validation or test figures: counts and rates in [0, 1]; None where a metric is undefined."""
    if summary is None:
        return
    summary = _mapping(summary, key)
    _count(summary.get("n_samples"), f"{key}.n_samples", optional=False)
    for name in _METRICS:
        _number(summary.get(name), f"{key}.{name}", *_UNIT)
    note = summary.get("balanced_accuracy_ci95_note")
    if note is not None and not isinstance(note, str):
        raise ValueError(f"{key}.balanced_accuracy_ci95_note is {note!r}, not a sentence")
    for name in ("auc", "positive_sensitivity_at_specificity_0.9"):  # a binary task's (card._summary)
        _number(summary.get(name), f"{key}.{name}", *_UNIT)
    if (positive := summary.get("positive")) is not None and positive not in classes:
        raise ValueError(f"{key}.positive is {positive!r}, not one of the classes {classes}")
    for name in ("balanced_accuracy_ci95", "auc_ci95"):
        ci = summary.get(name)
        if ci is None:
            continue
        if not isinstance(ci, list) or len(ci) != 2:
            raise ValueError(f"{key}.{name} is {ci!r}, not [low, high]")
        for value in ci:
            _number(value, f"{key}.{name}", *_UNIT)
        if None not in ci and ci[0] > ci[1]:
            raise ValueError(f"{key}.{name} {ci} has its low end above its high end")


def _check_risk(risk: Any, malignant: list[str]) -> None:
    """Both cut-offs in [0, 1] (or both None: no malignant validation image), the 0.95 one not above the 0.80 one;
    the cut-offs are for the sum over the classes the card marks malignant, and no others."""
    risk = _mapping(risk, "risk")
    if risk.get("malignant_classes", malignant) != malignant:
        raise ValueError(f"risk.malignant_classes is {risk['malignant_classes']!r}, not {malignant}")
    thresholds = _mapping(risk.get("thresholds"), "risk.thresholds")
    expected = {"sensitivity_0.95", "sensitivity_0.80"}
    if set(thresholds) != expected:
        raise ValueError(f"risk.thresholds has keys {sorted(thresholds)}, not {sorted(expected)}")
    for key, value in thresholds.items():
        _number(value, f"risk.thresholds.{key}", *_UNIT)
    elevated, high = thresholds["sensitivity_0.95"], thresholds["sensitivity_0.80"]
    if (elevated is None) != (high is None):
        raise ValueError("risk.thresholds has one cut-off and not the other")
    if elevated is not None and elevated > high:
        raise ValueError(f"risk.thresholds: the 0.95-sensitivity cut-off {elevated} is above the 0.80 one {high}")
    _check_cutoff_problem(risk)


def _check_cutoff_problem(risk: dict) -> None:
    """`problem` (why validation's cut-offs cannot separate anything: `risk.cutoff_problem`) is text or null, and a
    card that states one bands nothing; `measured_thresholds`, the unusable values it keeps for the record, are
    probabilities."""
    problem = risk.get("problem")
    if problem is not None and not (isinstance(problem, str) and problem):
        raise ValueError(f"risk.problem is {problem!r}, not a sentence")
    if problem is not None and any(v is not None for v in risk["thresholds"].values()):
        raise ValueError("risk.problem says the cut-offs cannot separate anything, but risk.thresholds holds them")
    for key, value in _mapping(risk.get("measured_thresholds") or {}, "risk.measured_thresholds").items():
        _number(value, f"risk.measured_thresholds.{key}", *_UNIT)


def _check_ood(ood: Any) -> None:
    ood = _mapping(ood, "ood")
    _number(ood.get("threshold"), "ood.threshold", 0, optional=False)
    _number(ood.get("distance_threshold"), "ood.distance_threshold", 0, optional=False)
    _number(ood.get("contrast_threshold"), "ood.contrast_threshold", 0, optional=False)
    _number(ood.get("validation_pass_rate"), "ood.validation_pass_rate", *_UNIT, optional=False)
    if ood["threshold"] == 0 or ood["distance_threshold"] == 0:
        raise ValueError("ood.threshold and ood.distance_threshold must be above 0")


def _counts(value: Any, key: str) -> None:
    """None, a count, or an object of them (nested): rows kept and rejected, counts by reason, by split and class."""
    if isinstance(value, dict):
        for name, inner in value.items():
            _counts(inner, f"{key}.{name}")
    else:
        _count(value, key)


def _check_training_data(data: Any) -> None:
    """The counts the card quotes; other keys (the data source) are the page's to read and are only JSON."""
    if data is None:
        return
    data = _mapping(data, "training_data")
    for key in ("rows", "rejected_by_reason", "class_counts"):
        _counts(data.get(key), f"training_data.{key}")
    for split, counts in _mapping(data.get("splits") or {}, "training_data.splits").items():
        counts = _mapping(counts, f"training_data.splits.{split}")
        for key in ("images", "groups", "samples"):
            _count(counts.get(key), f"training_data.splits.{split}.{key}")
        if not isinstance(counts.get("unit", ""), str):
            raise ValueError(f"training_data.splits.{split}.unit is {counts['unit']!r}, not a word")


def check_card(card: Any) -> dict[str, Any]:
    """`card` if every value the page and the risk band rely on has its type and range; else ValueError naming
    the first key at fault. Non-finite numbers never get this far: the JSON reader refuses them (see above)."""
    card = _mapping(card, "the card")
    for key in ("checkpoint", "arch"):
        if not isinstance(card.get(key), str) or control_character(card[key]) is not None:  # printed by serve
            raise ValueError(f"{key} is {card.get(key)!r}, not a name")
    _number(card.get("image_size"), "image_size", 1, optional=False)
    if not isinstance(card["image_size"], int):
        raise ValueError(f"image_size is {card['image_size']!r}, not a whole number of pixels")
    if DIGEST_KEY in card and not is_digest(card[DIGEST_KEY]):
        raise ValueError(f"{DIGEST_KEY} is {card[DIGEST_KEY]!r}, not a sha256 in hex")
    classes = card_classes(card)
    if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise ValueError(f"classes are {classes!r}, not two or more distinct class codes")
    entries = card.get("classes")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        for key in ("dx", "name"):
            text = entry.get(key) if isinstance(entry, dict) else entry if key == "dx" else None
            if isinstance(text, str) and (char := control_character(text)) is not None:  # see control_chars
                raise ValueError(f"classes[{i}].{key} is {text!r}, with a control character ({char!r})")
    _check_risk(card.get("risk"), card_malignant(card))
    _check_ood(card.get("ood"))
    _check_summary(card.get("validation"), "validation", classes)
    _check_summary(card.get("test"), "test", classes)
    _check_training_data(card.get("training_data"))
    return card


def card_malignant(card: dict[str, Any]) -> list[str]:
    """The classes a card marks malignant, in head order (HAM10000's for a card that predates descriptions): the
    sum its risk cut-offs were measured on, which `card.load_calibration` holds against the checkpoint's."""
    entries = card.get("classes")
    if not entries:
        return list(MALIGNANT)
    return [c["dx"] for c in entries if isinstance(c, dict) and c.get("malignant")]


def card_classes(card: dict[str, Any]) -> list[str]:
    """The class codes a card describes, in head order (HAM10000's for a card that predates descriptions)."""
    classes = card.get("classes")
    if classes is None:
        return list(CLASSES)
    if not isinstance(classes, list):
        raise ValueError(f"classes is {classes!r}, not a list")
    return [c.get("dx") if isinstance(c, dict) else c for c in classes]


def check_ood_tensors(means: Any, precision: Any, feature_dim: int, path: Path) -> None:
    """ood.pt's class means [C, D] (a row per class of the head) and precision [D, D]: finite, and the
    precision symmetric and positive semi-definite, so that every squared distance is a finite number >= 0.
    One NaN in the means made every /api/predict answer 500; a negative direction in the precision would give
    negative distances that never flag anything."""
    for name, tensor in (("means", means), ("precision", precision)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise UserError(f"{path}: {name} is not a floating-point tensor")
    rows_ok = means.ndim == 2 and means.shape[0] >= 2 and means.shape[1] == feature_dim
    if not rows_ok or tuple(precision.shape) != (feature_dim,) * 2:
        raise UserError(f"{path} does not fit this model (means {tuple(means.shape)}, features {feature_dim})")
    for name, tensor in (("means", means), ("precision", precision)):
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path}: {name} holds NaN or infinite values")
    p = precision.double()
    scale = float(p.abs().max())
    if float((p - p.T).abs().max()) > 1e-5 * scale:
        raise UserError(f"{path}: the precision matrix is not symmetric")
    eigenvalues = torch.linalg.eigvalsh((p + p.T) / 2)
    if scale == 0 or float(eigenvalues.min()) < -1e-6 * float(eigenvalues.abs().max()):
        raise UserError(f"{path}: the precision matrix is not positive semi-definite (distances could be negative)")
