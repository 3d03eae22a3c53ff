"""Which classes make up "malignant": one source, the checkpoint, and a model with none said so everywhere.

- The risk cut-offs are measured on the sum that predict and serve show: the checkpoint's malignant classes.
  A card measured on other classes is set aside with the reason; evaluate --split val refuses shards that mark
  other classes malignant than the checkpoint (an image with akiec 0.79 + bcc 0.13 got "High" against cut-offs
  on p(mel)).
- A model with no malignant class (a custom dataset whose spec marks none) gets no malignant probability and no
  band, and predict (text and --json), serve's JSON and the card say so in `report.NO_MALIGNANT`'s words, never
  "malignant (): <1%" beside "melanoma 96%".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from skinlesion.card import CARD, calibrate
from skinlesion.cli import main
from skinlesion.errors import UserError
from skinlesion.model import load_for_inference
from skinlesion.report import NO_MALIGNANT, Calibration
from skinlesion.serve import Settings, create_app

CUSTOM = ["c0", "c1", "c2", "c3", "c4", "c5", "c6"]  # a custom dataset's codes: no preset to take malignant ones from


def _rewrite(source: Path, target: Path, **fields: object) -> Path:
    """best.pt with some of its fields replaced (or removed, for None): what another dataset's run would carry."""
    obj = torch.load(source, map_location="cpu", weights_only=True)
    for key, value in fields.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, target)
    return target


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lesion") / "lesion.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def _copy_calibrated(calibrated: Path, folder: Path) -> Path:
    for name in ("best.pt", CARD, "ood.pt"):
        shutil.copy(calibrated.parent / name, folder / name)
    return folder / "best.pt"


# --- one source of malignant classes: the checkpoint -----------------------------------------------------------


def test_a_card_measured_on_other_malignant_classes_is_set_aside_with_the_reason(calibrated, tmp_path) -> None:
    checkpoint = _copy_calibrated(calibrated, tmp_path)
    loaded = load_for_inference(checkpoint)
    assert Calibration.load(checkpoint, loaded).problem is None  # the card as written fits
    card = json.loads((tmp_path / CARD).read_text())
    for entry in card["classes"]:
        entry["malignant"] = entry["dx"] == "mel"
    card["risk"]["malignant_classes"] = ["mel"]  # cut-offs on p(mel), while the checkpoint sums akiec+bcc+mel
    (tmp_path / CARD).write_text(json.dumps(card))
    calibration = Calibration.load(checkpoint, loaded)
    assert calibration.card is None and calibration.ood is None
    assert "malignant classes ['mel']" in calibration.problem
    assert "['akiec', 'bcc', 'mel']" in calibration.problem and "evaluate" in calibration.problem


def test_a_checkpoint_that_marks_other_classes_malignant_than_its_card_gets_no_band(calibrated, tmp_path, image):
    """The other way round: the checkpoint's facts say mel only, the card (from the shards) akiec+bcc+mel."""
    _copy_calibrated(calibrated, tmp_path)
    checkpoint = _rewrite(calibrated, tmp_path / "best.pt", malignant=["mel"])
    loaded = load_for_inference(checkpoint)
    assert loaded.malignant == ("mel",)
    calibration = Calibration.load(checkpoint, loaded)
    assert calibration.card is None and "['akiec', 'bcc', 'mel']" in calibration.problem


def test_evaluate_val_refuses_shards_that_mark_other_malignant_classes(calibrated, shards_dir, tmp_path, capsys):
    checkpoint = _rewrite(calibrated, tmp_path / "run" / "best.pt", malignant=["mel"])
    args = ["evaluate", "--checkpoint", str(checkpoint), "--shards", str(shards_dir), "--split", "val"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "['mel']" in err and "['akiec', 'bcc', 'mel']" in err
    assert not (checkpoint.parent / CARD).exists() and not (checkpoint.parent / "eval-val").exists()


def test_calibrate_refuses_to_measure_cut_offs_on_other_classes_than_the_checkpoints(calibrated, shards_dir, tmp_path):
    """What the trainer's calibrate call relies on too: the checkpoint's malignant classes, or a one-line refusal."""
    shutil.copy(calibrated, tmp_path / "best.pt")
    loaded = load_for_inference(tmp_path / "best.pt")
    with pytest.raises(UserError, match=r"marks \['mel'\] malignant.*marks \['akiec', 'bcc', 'mel'\]"):
        calibrate(loaded.model, tmp_path / "best.pt", shards_dir, loaded.image_size, loaded.arch, malignant=("mel",))
    assert not (tmp_path / CARD).exists()


# --- a model with no malignant class -----------------------------------------------------------------------------


def test_an_empty_malignant_list_is_kept_not_replaced_by_a_presets(random_run, tmp_path) -> None:
    """A custom dataset with HAM10000's codes and no malignant class: [] is its answer, not a missing field."""
    checkpoint = _rewrite(random_run / "best.pt", tmp_path / "best.pt", malignant=[])
    assert load_for_inference(checkpoint).malignant == ()
    assert load_for_inference(random_run / "best.pt").malignant == ("akiec", "bcc", "mel")  # field absent: preset's


@pytest.fixture(scope="module")
def benign_only(random_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An existing checkpoint of a custom dataset with no malignant class (its facts lack the field)."""
    folder = tmp_path_factory.mktemp("benign-only")
    return _rewrite(random_run / "best.pt", folder / "best.pt", classes=CUSTOM, malignant=None)


def test_predict_says_there_is_no_malignant_class_instead_of_an_empty_sum(benign_only, image, capsys) -> None:
    args = ["predict", "--checkpoint", str(benign_only), str(image)]
    assert main([*args, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["model"]["malignant_classes"] == [] and document["model"]["malignant_note"] == NO_MALIGNANT
    (entry,) = document["results"]
    assert entry["malignant_probability"] is None and entry["malignant_percent"] is None
    assert entry["risk"] is None and entry["risk_label"] is None and entry["risk_note"] == NO_MALIGNANT
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"  {NO_MALIGNANT}\n" in text
    assert "malignant (" not in text and "risk band:" not in text


def test_serve_answers_what_predict_says_for_a_model_without_malignant_classes(benign_only, image, capsys) -> None:
    assert main(["predict", "--json", "--checkpoint", str(benign_only), str(image)]) == 0
    (expected,) = json.loads(capsys.readouterr().out)["results"]
    app = create_app(Settings(benign_only))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        model = client.get("/api/model").json()
        assert model["malignant_classes"] == [] and model["malignant_note"] == NO_MALIGNANT
        files = [("files", ("lesion.png", image.read_bytes(), "image/png"))]
        (entry,) = client.post("/api/predict?cam=0", files=files).json()
    for key in ("malignant_probability", "malignant_percent", "malignant_classes", "risk", "risk_label", "risk_note"):
        assert entry[key] == expected[key], key


def test_the_card_of_a_model_without_malignant_classes_says_so(random_run, shards_dir, tmp_path, image, capsys):
    """Shards of a custom dataset with no malignant class: the card has no cut-offs and says why, and predict
    with that card shows the statement, not a band."""
    shards = tmp_path / "shards"
    shutil.copytree(shards_dir, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    for entry in manifest["dataset"]["classes"]:
        entry["malignant"] = False
    (shards / "manifest.json").write_text(json.dumps(manifest))
    checkpoint = _rewrite(random_run / "best.pt", tmp_path / "run" / "best.pt", malignant=[])
    loaded = load_for_inference(checkpoint)
    calibrate(loaded.model, checkpoint, shards, loaded.image_size, loaded.arch, malignant=loaded.malignant)
    card = json.loads((checkpoint.parent / CARD).read_text())
    assert NO_MALIGNANT in card["intended_use"] and "and a malignancy risk band" not in card["intended_use"]
    assert card["risk"]["malignant_classes"] == [] and set(card["risk"]["thresholds"].values()) == {None}
    assert main(["predict", "--checkpoint", str(checkpoint), str(image)]) == 0
    text = capsys.readouterr().out
    assert "note: no risk bands" not in text  # the card is used ...
    assert f"  {NO_MALIGNANT}\n" in text and "malignant (" not in text  # ... and says there is nothing to band
