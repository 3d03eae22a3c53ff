"""The model card and ood.pt are used only for the weights they were computed on, and only with sane values.

Issue 16, points 1 and 2: with the epoch-2 weights put beside the epoch-3 card, serve still said "available" and
flagged 21 of 60 ordinary images; NaN cut-offs put a 0.947 malignant probability in the "low" band; a list of
cut-offs or one NaN in ood.pt's means gave a traceback or a 500 on every request.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import plain_jpeg, serve_client

from skinlesion.checkpoint import export_best
from skinlesion.errors import UserError
from skinlesion.facts import ModelFacts
from skinlesion.serve import Settings, create_app


@pytest.fixture
def served(calibrated: Path, tmp_path: Path) -> Path:
    """A copy of `calibrated` that a test may change; returns its best.pt."""
    for name in ("best.pt", "model_card.json", "ood.pt"):
        shutil.copy(calibrated.parent / name, tmp_path / name)
    return tmp_path / "best.pt"


def _predict(client: TestClient, data: bytes) -> dict:
    response = client.post("/api/predict", files=[("files", ("a.jpg", data))])
    assert response.status_code == 200, response.text
    return response.json()[0]


def _card_applies(entry: dict) -> bool:
    """The card was used: the OOD check ran, and a band is shown unless the image was flagged (issue 17: no band
    for an unfamiliar image)."""
    return entry["ood"] is not None and (entry["risk"] is not None or entry["ood"]["flag"])


def _replace_weights(checkpoint: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite best.pt in place with changed weights: same name, architecture and size, as a newer epoch is."""
    raw = torch.load(checkpoint, weights_only=True)
    state = raw["model"]
    change(state)
    facts = ModelFacts(arch=raw["arch"], classes=tuple(raw["classes"]), image_size=raw["image_size"])
    export_best(state, checkpoint, facts=facts, epoch=raw["epoch"] + 1, step=raw["step"], metric=raw["metric"])


def _nudge(state: dict[str, torch.Tensor]) -> None:
    state["fc.bias"] += 0.01  # another epoch's weights: nothing else tells them apart


def test_the_card_of_other_weights_is_ignored_and_the_page_is_told_why(served: Path) -> None:
    with serve_client(served) as client:
        card = client.get("/api/model").json()
        assert card["available"] and card["weights_sha256"] == card["weights_sha256"].lower()
        assert _card_applies(_predict(client, plain_jpeg()))
    _replace_weights(served, _nudge)
    with serve_client(served) as client:
        card = client.get("/api/model").json()
        assert not card["available"] and "computed on other weights than best.pt" in card["reason"]
        assert "skinlesion evaluate" in card["reason"] and "--split val" in card["reason"]
        entry = _predict(client, plain_jpeg())
        assert entry["risk"] is None and entry["ood"] is None and entry["predictions"]


def test_the_same_weights_exported_as_model_pt_share_the_card(served: Path, random_run: Path) -> None:
    """The digest is over the tensors, not the file: model.pt and best.pt of one run are the same weights."""
    shutil.copy(random_run / "model.pt", served.parent / "model.pt")
    with serve_client(served.parent / "model.pt") as client:
        card = client.get("/api/model").json()
        assert card["available"] and card["checkpoint"] == "model.pt"  # the file served, not the one beside the card
        assert _card_applies(_predict(client, plain_jpeg()))


def test_an_ood_file_of_other_weights_is_ignored_too(served: Path) -> None:
    raw = torch.load(served.parent / "ood.pt", weights_only=True)
    raw["weights_sha256"] = "0" * 64
    torch.save(raw, served.parent / "ood.pt")
    with serve_client(served) as client:
        card = client.get("/api/model").json()
        assert not card["available"] and "ood.pt was computed on other weights" in card["reason"]
        assert _predict(client, plain_jpeg())["ood"] is None


def test_a_card_without_a_weights_digest_cannot_be_matched_and_is_ignored(served: Path) -> None:
    card = json.loads((served.parent / "model_card.json").read_text())
    del card["weights_sha256"]  # as skinlesion wrote cards before they recorded their weights
    (served.parent / "model_card.json").write_text(json.dumps(card))
    with serve_client(served) as client:
        reply = client.get("/api/model").json()
        assert not reply["available"] and "records no weights digest" in reply["reason"]


def _card(**changes: object) -> Callable[[Path], None]:
    """Set dotted keys of model_card.json (written with json.dumps, which writes NaN as NaN, as Python reads it)."""

    def edit(folder: Path) -> None:
        card = json.loads((folder / "model_card.json").read_text())
        for dotted, value in changes.items():
            *parents, last = dotted.split("/")
            node = card
            for key in parents:
                node = node[key]
            node[last] = value
        (folder / "model_card.json").write_text(json.dumps(card))

    return edit


def _ood(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        raw = torch.load(folder / "ood.pt", weights_only=True)
        change(raw)
        torch.save(raw, folder / "ood.pt")

    return edit


def _nan_mean(raw: dict) -> None:
    raw["means"][0, 0] = math.nan


def _negative_precision(raw: dict) -> None:
    raw["precision"] = -raw["precision"]


def _text(old: str, new: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "model_card.json"
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))

    return edit


T95, T80 = "risk/thresholds/sensitivity_0.95", "risk/thresholds/sensitivity_0.80"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_card(**{T95: math.nan, T80: math.nan}), "NaN is not a finite number"),
        (_card(**{"risk/thresholds": [0.2, 0.5]}), "risk.thresholds is a list, not an object"),
        (_card(**{T80: 1.5}), "risk.thresholds.sensitivity_0.80=1.5 is outside [0, 1]"),
        (_card(**{T95: 0.9, T80: 0.1}), "the 0.95-sensitivity cut-off 0.9 is above the 0.80 one"),
        (_card(**{T95: "0.2"}), "risk.thresholds.sensitivity_0.95 is '0.2', not a number"),
        (_card(**{T95: None}), "one cut-off and not the other"),
        (_card(**{"risk/malignant_classes": ["mel"]}), "risk.malignant_classes"),
        (_card(**{"risk/problem": "saturated"}), "risk.problem says the cut-offs cannot separate anything, but"),
        (_card(**{"risk/measured_thresholds": {"sensitivity_0.95": 2.0}}), "measured_thresholds.sensitivity_0.95=2.0"),
        (_card(**{"training_data/splits/train/images": -1}), "training_data.splits.train.images is -1, not a count"),
        (_card(**{"ood/distance_threshold": -3.0}), "ood.distance_threshold=-3.0 is outside"),
        (_card(**{"validation/balanced_accuracy": 1.5}), "validation.balanced_accuracy=1.5"),
        (_card(**{"validation/balanced_accuracy_ci95": [0.9, 0.1]}), "low end above its high end"),
        (_card(**{"validation/n_samples": -1}), "validation.n_samples is -1, not a count"),
        (_card(**{"validation/auc_ci95": [0.9, 0.1]}), "validation.auc_ci95 [0.9, 0.1] has its low end above"),
        (_card(**{"validation/auc": 2.0}), "validation.auc=2.0 is outside [0, 1]"),
        (_card(**{"validation/positive": "\u202emel"}), r"validation.positive is '\u202emel', not one of the classes"),
        (_card(**{"validation/positive_sensitivity_at_specificity_0.9": -0.5}), "specificity_0.9=-0.5 is outside"),
        (_card(image_size="32"), "image_size is '32', not a number"),
        (_card(weights_sha256="abc"), "weights_sha256 is 'abc', not a sha256"),
        (_text('"ece": ', '"ece": 1e999, "was": '), "1e999 is not a finite number"),
        (_ood(_nan_mean), "means holds NaN or infinite values"),
        (_ood(_negative_precision), "not positive semi-definite"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_every_card_and_ood_value_is_checked_at_start(served: Path, edit, message) -> None:
    edit(served.parent)
    with pytest.raises(UserError, match=r"damaged|ood\.pt") as caught:
        create_app(Settings(served))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_weights_with_nan_are_refused_at_start_not_answered_with_500(served: Path) -> None:
    _replace_weights(served, lambda state: state["fc.weight"].__setitem__((0, 0), math.nan))
    with pytest.raises(UserError, match=r"NaN or infinite values \(fc.weight\)"):
        create_app(Settings(served))
