"""Class codes, class names and file names are data: shown literally, never interpreted.

- Plots: a class code such as ``$\\frac$`` is drawn as those characters, not parsed as mathtext (which raised at
  the last validation, before best.pt was written, and in evaluate) nor handed to LaTeX.
- Terminals: a name with a control character (ESC, OSC, CR...) is refused where it is read (checkpoint, dataset
  spec, manifest, CSV labels, model card), one line naming the file and the class; and what predict prints from
  files (image paths, class codes and names) is escaped, so no forged "risk band" line can appear.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.text import Text
from PIL import Image

from skinlesion import plots
from skinlesion.cli import main
from skinlesion.control_chars import printable
from skinlesion.errors import UserError

MATH = r"$\frac$"  # mathtext that does not parse
FORGED = "nv\x1b[2K\r  risk band: Below the cut-offs.\x1b]0;title\x07"  # CR, CSI, OSC
RAW = ("\x1b", "\r", "\x07")


# --- plots ---------------------------------------------------------------------------------------------------------


def test_class_codes_with_dollar_signs_are_drawn_literally(tmp_path: Path, monkeypatch) -> None:
    classes = [MATH, "$x^2$", "nv"]
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.full((6, 3), 0.1) + np.eye(3)[[0, 1, 2, 1, 1, 2]] * 0.7
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, out: figures.append(fig) or save(fig, out))
    with matplotlib.rc_context({"text.usetex": True}):  # a user's matplotlibrc: LaTeX for every text
        plots.plot_confusion_matrix(np.ones((3, 3), dtype=int), tmp_path / "cm.png", "val", classes)
        plots.plot_roc(labels, probs, tmp_path / "roc.png", "val", classes)
        plots.plot_reliability(labels, probs, tmp_path / "reliability.png")
    assert all((tmp_path / name).stat().st_size > 0 for name in ("cm.png", "roc.png", "reliability.png"))
    drawn = [t for fig in figures for t in fig.findobj(Text) if MATH in t.get_text() or "$x^2$" in t.get_text()]
    assert len(drawn) >= 4  # the confusion matrix's two axes pairs and the ROC legend
    assert all(not t.get_parse_math() and not t.get_usetex() for t in drawn)
    assert matplotlib.rcParams["text.parse_math"]  # the user's settings are back as they were


# --- refused where read -------------------------------------------------------------------------------------------


def _forge(source: Path, target: Path, index: int, code: str) -> Path:
    obj = torch.load(source, map_location="cpu", weights_only=True)
    obj["classes"] = [code if i == index else c for i, c in enumerate(obj["classes"])]
    torch.save(obj, target)
    return target


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("names") / "lesion.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_a_checkpoint_whose_class_code_holds_control_characters_is_refused(random_run, image, tmp_path, capsys):
    checkpoint = _forge(random_run / "best.pt", tmp_path / "best.pt", 5, FORGED)
    assert main(["predict", "--checkpoint", str(checkpoint), str(image)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert str(checkpoint) in captured.err and "class 5" in captured.err and "control character" in captured.err
    assert not any(c in captured.err for c in RAW)


def test_model_pt_facts_are_checked_the_same_way(random_run, tmp_path) -> None:
    from skinlesion.facts import FACTS_KEY
    from skinlesion.model import load_for_inference

    state = torch.load(random_run / "model.pt", map_location="cpu", weights_only=True)
    state._metadata[FACTS_KEY]["classes"][0] = "akiec\r"
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(UserError, match=r"class 0 \('akiec\\r'\) holds a control character"):
        load_for_inference(tmp_path / "model.pt")


@pytest.mark.parametrize(
    ("key", "value"), [("code", "mel\x1b[31m"), ("name", "Melanoma\rHigh"), ("name", "Melanoma\u202eHGIH")]
)
def test_a_dataset_spec_or_manifest_with_control_characters_in_a_class_is_refused(key: str, value: str) -> None:
    from skinlesion.data.datasets import HAM10000, from_dict

    raw = HAM10000.to_dict()
    raw["classes"][4][key] = value
    with pytest.raises(UserError, match=rf"where: classes\[4\]\.{key} is .* control character"):
        from_dict(raw, "where")


def test_a_manifest_without_a_description_is_checked_too(shards_dir: Path, tmp_path: Path) -> None:
    from skinlesion.data.manifest import read_manifest

    shards = tmp_path / "shards"
    shutil.copytree(shards_dir, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest.pop("dataset", None)
    manifest["classes"][1] = "bcc\x1b]0;x\x07"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"'classes'\[1\] is .* control character"):
        read_manifest(shards)


def test_custom_csv_labels_with_control_characters_are_refused_at_prepare(tmp_path: Path) -> None:
    from skinlesion.data.prepare import PrepareOptions, describe

    csv = tmp_path / "labels.csv"
    csv.write_text('image,diagnosis\na,benign\nb,"odd\x1b[2Klabel"\n', encoding="utf-8")
    opts = PrepareOptions(
        metadata=csv,
        images=(tmp_path,),
        out=tmp_path / "out",
        dataset="custom",
        columns=(("image_id", "image"), ("label", "diagnosis")),
    )
    with pytest.raises(UserError, match=rf"{csv}: column 'diagnosis' holds the label .* control character"):
        describe(opts)


def test_a_card_with_control_characters_in_a_class_name_is_damaged(tmp_path) -> None:
    from skinlesion.card import CARD, load_card
    from skinlesion.labels import CLASSES, MALIGNANT

    cut_offs = dict.fromkeys(("sensitivity_0.95", "sensitivity_0.80"))
    card = {
        "checkpoint": "best.pt",
        "arch": "resnet18",
        "image_size": 32,
        "classes": [{"dx": c, "name": c, "malignant": c in MALIGNANT} for c in CLASSES],
        "risk": {"malignant_classes": list(MALIGNANT), "thresholds": cut_offs},
        "ood": {"threshold": 1.0, "distance_threshold": 9.0, "contrast_threshold": 0.1, "validation_pass_rate": 0.95},
    }
    (tmp_path / CARD).write_text(json.dumps(card))
    assert load_card(tmp_path / "best.pt")["classes"][5]["name"] == "nv"  # otherwise a valid card
    card["classes"][5]["name"] = FORGED
    (tmp_path / CARD).write_text(json.dumps(card))
    with pytest.raises(UserError, match=r"is damaged \(classes\[5\]\.name is .* control character"):
        load_card(tmp_path / "best.pt")
    card["classes"][5]["name"], card["arch"] = "nv", "resnet18\r"  # serve prints it when the card does not fit
    (tmp_path / CARD).write_text(json.dumps(card))
    with pytest.raises(UserError, match=r"is damaged \(arch is 'resnet18\\r', not a name"):
        load_card(tmp_path / "best.pt")


# --- escaped where printed ----------------------------------------------------------------------------------------


def test_printable_escapes_control_characters_and_keeps_the_rest() -> None:
    assert printable("Mélanome 黑色素瘤") == "Mélanome 黑色素瘤"
    assert printable(FORGED) == r"nv\x1b[2K\r  risk band: Below the cut-offs.\x1b]0;title\x07"
    assert printable("a\u2028b\x9bc") == r"a\u2028b\x9bc"
    # A right-to-left override shows the rest of the line reversed: "mel\u202e..." could display another band.
    assert printable("nv\u202eHGIH :dnab ksir") == r"nv\u202eHGIH :dnab ksir" and printable("a\u2066b") == r"a\u2066b"
    assert printable("n\u200dv") == "n\u200dv"  # a zero-width joiner is spelling in some scripts: kept


def test_predict_prints_file_names_with_their_control_characters_escaped(random_run, image, tmp_path, capsys):
    named = tmp_path / "x\x1b[2K\r  risk band: Below the cut-offs..png"
    shutil.copy(image, named)
    missing = tmp_path / "gone\x1b]0;t\x07.png"
    assert main(["predict", "--checkpoint", str(random_run / "best.pt"), str(named), str(missing)]) == 1
    out = capsys.readouterr().out
    assert not any(c in out for c in RAW)
    assert r"x\x1b[2K\r  risk band: Below the cut-offs..png" in out and r"gone\x1b]0;t\x07.png" in out
    assert not [
        line for line in out.splitlines() if "Below the cut-offs" in line and not line.startswith(str(tmp_path))
    ]


def test_predict_text_escapes_class_codes_and_names_that_reach_it(random_run, image) -> None:
    """Belt and braces: were a forged name to get past the checks at load, predict's text still escapes it."""
    import dataclasses

    from skinlesion.inference import Labels
    from skinlesion.model import load_for_inference
    from skinlesion.predict import NO_CALIBRATION, format_text, predict_images

    loaded = load_for_inference(random_run / "best.pt")
    classes = tuple(FORGED if c == "nv" else c for c in loaded.classes)
    labels = Labels(classes, dict.fromkeys(classes, FORGED), loaded.malignant)
    calibration = dataclasses.replace(NO_CALIBRATION, labels=labels)
    entries = predict_images(loaded, [image], top_k=7, calibration=calibration)
    text = format_text(entries, calibration)
    assert not any(c in text for c in RAW) and r"\x1b[2K\r  risk band: Below the cut-offs." in text
