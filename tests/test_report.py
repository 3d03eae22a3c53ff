"""What a clinician is told, in words and numbers: whole percents, band wording, the OOD notice, the banner of a
model not trained on real dermoscopy, and the model card's record of where its training images came from.

`skinlesion predict` (text and --json) and evaluate's predictions.csv are checked here against the same
calibrated model; the page is checked against predict in tests/test_browser.py.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinlesion.card import limitations, training_source
from skinlesion.cli import main
from skinlesion.data.source import describe
from skinlesion.report import BAND_LABELS, OOD_NOTICE, SYNTHETIC_BANNER, UNKNOWN_SOURCE_BANNER, banner, percent


@pytest.mark.parametrize(
    ("p", "shown"),
    [
        (0.0, "<1%"),
        (0.0099, "<1%"),
        (0.01, "1%"),
        (0.125, "13%"),
        (0.135, "14%"),
        (0.5, "50%"),
        (0.826, "83%"),
        (0.99, "99%"),
        (0.9901, ">99%"),
        (1.0, ">99%"),
    ],
)
def test_whole_percents_round_half_up_with_open_ends(p: float, shown: str) -> None:
    assert percent(p) == shown  # 0.125 -> 13% (Python's round() would say 12%, the page's Math.round 13%)


def test_the_source_is_synthetic_for_synth_ids_and_real_for_ham10000_ids(tmp_path: Path) -> None:
    from skinlesion.data.synthetic import plan

    synthetic = pd.DataFrame(plan(60, seed=3))
    got = describe(Path("data/synthetic/HAM10000_metadata.csv"), synthetic)
    assert (got["kind"], got["synthetic"], got["images"], got["synthetic_images"]) == ("synthetic", True, 60, 60)
    real = pd.DataFrame(
        {
            "lesion_id": ["HAM_0000118", "HAM_0000118", "HAM_0002730"],
            "image_id": ["ISIC_0027419", "ISIC_0025030", "ISIC_0026769"],
            "dataset": ["vidir_modern", "vidir_modern", "rosendahl"],
        }
    )
    got = describe(Path("HAM10000_metadata.csv"), real)
    assert (got["kind"], got["synthetic"], got["dataset"], got["lesions"]) == ("real", False, "HAM10000", 2)
    assert got["contributors"] == {"vidir_modern": 2, "rosendahl": 1}
    mixed = describe(Path("mine.csv"), pd.concat([real, synthetic.head(2)]))
    assert (mixed["kind"], mixed["synthetic"], mixed["dataset"]) == ("mixed", True, "mine")


def test_the_card_records_the_manifest_source_and_limitations_fit_it(calibrated: Path, shards_dir: Path) -> None:
    card = json.loads((calibrated.parent / "model_card.json").read_text())
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    assert card["training_data"]["source"] == manifest["source"] and manifest["source"]["kind"] == "synthetic"
    assert "synthetic pictures" in card["limitations"][0] and "fair-skinned" not in " ".join(card["limitations"])
    assert banner(card) == SYNTHETIC_BANNER
    assert training_source({"splits": {}})["kind"] == "unknown"  # shards prepared before the source was recorded
    unknown = card | {"training_data": {"source": training_source({})}}
    assert banner(unknown) == UNKNOWN_SOURCE_BANNER
    real = {"kind": "real", "synthetic": False, "dataset": "HAM10000"}
    assert banner(card | {"training_data": {"source": real}}) is None
    assert "fair-skinned" in limitations(real)[0] and "synthetic" not in " ".join(limitations(real))
    # "Trained on" is the train split's distinct images and lesions (before balancing repeats them), not the
    # dataset's total over train, val and test.
    train = manifest["splits"]["train"]
    assert card["training_data"]["splits"]["train"] == {
        "images": train["images"],
        "groups": train["lesions"],
        "unit": "lesions",
        "samples": train["samples"],
    }
    assert train["images"] < manifest["source"]["images"] and train["images"] < train["samples"]


def _plain_skin(path: Path) -> Path:
    from skinlesion.data.lesions import not_lesions

    not_lesions(n=1)["skin without a lesion"][0].save(path, format="JPEG", quality=92)
    return path


def test_predict_prints_the_banner_band_words_and_notice_and_no_band_when_flagged(calibrated, tmp_path, capsys):
    from skinlesion.data.lesions import make_lesion, render

    skin = _plain_skin(tmp_path / "skin.jpg")
    lesions = []
    for i, dx in enumerate(("mel", "nv", "bcc")):
        rng = np.random.default_rng(20 + i)
        lesions.append(tmp_path / f"{dx}.jpg")
        render(make_lesion(rng, dx), rng).save(lesions[-1], format="JPEG", quality=92)
    args = ["predict", "--checkpoint", str(calibrated), str(skin), *map(str, lesions)]
    assert main([*args, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["model"]["banner"] == SYNTHETIC_BANNER
    assert document["model"]["training_data_source"]["kind"] == "synthetic"
    flagged, *others = document["results"]
    assert flagged["ood"]["flag"] and flagged["risk"] is None and flagged["notice"] == OOD_NOTICE
    assert flagged["risk_note"].startswith("No risk band")
    banded = [e for e in others if e["risk"]]
    assert banded, "no synthetic lesion passed the OOD check: the test needs one with a band"
    for entry in banded:
        assert entry["ood"]["flag"] is False and entry["notice"] is None
        assert entry["risk_label"] == BAND_LABELS[entry["risk"]] and "cut-off" in entry["risk_note"]
        assert entry["malignant_percent"] == percent(entry["malignant_probability"])
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"WARNING: {SYNTHETIC_BANNER}")
    blocks = [b for b in text.split("\n\n")[1:-1] if not b.startswith("note: ")]  # a note on an older checkpoint
    skin_block = blocks.pop(0)
    assert f"NOT RELIABLE: {OOD_NOTICE}" in skin_block and "risk band: No risk band" in skin_block
    for entry in banded:
        block = next(b for b in blocks if b.startswith(entry["image"]))
        assert f"risk band: {entry['risk_label']}. {entry['risk_note']}" in block
        assert f"malignant (akiec + bcc + mel): {entry['malignant_percent']}" in block
        assert all(f"  {p['percent']}" in block for p in entry["predictions"])
    assert "%" in text and ".0%" not in text and "low" not in text.lower().split()


def test_evaluate_writes_the_ood_score_and_flag_that_predict_gives_beside_the_submission(calibrated, tmp_path, capsys):
    from skinlesion.data.lesions import make_lesion, render

    rng = np.random.default_rng(4)
    images = {"ISIC_0000001": _plain_skin(tmp_path / "skin.jpg"), "ISIC_0000002": tmp_path / "lesion.jpg"}
    render(make_lesion(rng, "mel"), rng).save(images["ISIC_0000002"], format="JPEG", quality=92)
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "test-000000.tar", "w") as tar:
        for key, path in images.items():
            for member, data in (
                (f"{key}.jpg", path.read_bytes()),
                (f"{key}.cls", b"4"),
                (f"{key}.json", json.dumps({"image_id": key, "dx": "mel"}).encode()),  # cls 4 is mel, as prepare writes
            ):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = {
        "classes": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
        "splits": {"test": {"samples": 2, "files": ["test-000000.tar"], "shard_samples": [2]}},
    }
    (shards / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(calibrated), "--shards", str(shards), "--out", str(out)]) == 0
    # The submission holds the ISIC 2018 columns only (the official scorer refuses any other: issue 21, point 16);
    # the OOD verdicts are in ood.csv beside it, for the same images in the same order.
    submission = list(csv.reader((out / "predictions.csv").open()))
    assert submission[0] == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    rows = list(csv.DictReader((out / "ood.csv").open()))
    assert list(rows[0]) == ["image", "ood_score", "ood_flag"]
    assert [row["image"] for row in rows] == [line[0] for line in submission[1:]] == list(images)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(calibrated), *map(str, images.values()), "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)["results"]
    for row, entry in zip(rows, predicted, strict=True):
        assert float(row["ood_score"]) == pytest.approx(entry["ood"]["score"], rel=1e-5)
        assert row["ood_flag"] == str(int(entry["ood"]["flag"]))
    assert rows[0]["ood_flag"] == "1"  # the plain skin


def test_a_model_without_a_card_for_its_weights_gets_the_unverified_banner() -> None:
    """Without a card (or with one of other weights) nothing says where the training images came from: the page
    and predict warn, as for a card that does not say real data."""
    assert banner(None) == UNKNOWN_SOURCE_BANNER


def test_synth_isic2020_pictures_are_named_for_their_layout_and_its_groups_are_patients() -> None:
    from skinlesion.card import split_counts
    from skinlesion.data import datasets

    synthetic = pd.DataFrame({"image_id": ["ISIC_9000000", "ISIC_9000001"], "lesion_id": ["IP_9000000"] * 2})
    got = describe(Path("ISIC_2020_Training_GroundTruth.csv"), synthetic, "isic2020", "patient_id")
    assert got["dataset"] == "skinlesion synth (synthetic ISIC 2020-style pictures)"  # was "HAM10000-style"
    assert (got["groups"], got["group_unit"]) == (1, "patients")
    real = pd.DataFrame({"image_id": ["ISIC_0000000", "ISIC_0000001"], "lesion_id": ["IP_0000001", "IP_0000002"]})
    got = describe(Path("ISIC_2020_Training_GroundTruth.csv"), real, "isic2020", "patient_id")
    assert (got["kind"], got["dataset"], got["groups"]) == ("real", "ISIC_2020_Training_GroundTruth", 2)
    assert "synthetic" not in got["dataset"]
    manifest = {"splits": {"train": {"samples": 900, "images": 604, "lesions": 343}, "val": {"images": 10}}}
    counts = split_counts(manifest, datasets.preset("isic2020"))
    assert counts["train"] == {"images": 604, "groups": 343, "unit": "patients", "samples": 900}
    assert counts["val"]["unit"] == "patients" and counts["val"]["groups"] is None


def _scores(positives: list[float], others: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(positives + others), np.array([True] * len(positives) + [False] * len(others))


@pytest.mark.parametrize(
    ("positives", "others", "why"),
    [
        ([1.0] * 12, [0.25] * 30, "the sensitivity 0.95 cut-off is 1, the top of the scale"),  # saturated, 2 epochs
        ([0.5] * 6 + [0.75] * 6, [0.875] * 30, "every validation image, malignant or not, scores at or above"),
        ([0.75] * 5, [0.25] * 30, "validation has 5 malignant images, fewer than 10"),
        ([0.5] * 6 + [0.75] * 6, [0.25] * 30, None),  # cut-offs 0.5 and 0.75: they separate
    ],
)
def test_cutoffs_that_cannot_separate_anything_give_no_band_and_say_why(positives, others, why) -> None:
    import torch

    from skinlesion.report import Calibration
    from skinlesion.risk import cutoff_problem, risk_band, risk_thresholds

    malignant, is_malignant = _scores(positives, others)
    measured = risk_thresholds(malignant, is_malignant)
    problem = cutoff_problem(malignant, is_malignant, measured)
    assert problem is None if why is None else why in problem
    if why is None:
        assert risk_band(0.8, measured) == "high"
        return
    card = {"risk": {"thresholds": dict.fromkeys(measured), "measured_thresholds": measured, "problem": problem}}
    probs = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.9, 0.1, 0.0])  # HAM10000's order: 90% melanoma
    entry = Calibration(card=card, ood=None, problem=None).judge(probs, None)
    assert entry["risk"] is None and entry["risk_label"] is None
    assert entry["risk_note"].startswith("No risk band: the cut-offs from validation cannot separate malignant")
    assert why in entry["risk_note"] and ">99%" not in entry["risk_note"]


@pytest.mark.parametrize("band", ["high", "elevated", "below_cutoffs"])
def test_band_notes_say_which_percent_is_a_cut_off_and_which_a_share_caught(band: str) -> None:
    """ "(below the 80% cut-off, 90%)" put a sensitivity beside a probability: each cut-off is now named as a
    malignant probability, with the share of malignant validation lesions it caught said in words."""
    from skinlesion.report import band_note

    note = band_note(band, {"sensitivity_0.95": 0.45, "sensitivity_0.80": 0.9})
    assert "Cut-offs on the malignant probability: 90% for High (it caught 80% of the malignant validation " in note
    assert "45% for Elevated (it caught 95% of them)" in note
    assert re.search(r"\d% cut-off|cut-off, \d", note) is None  # never "the 80% cut-off, 90%"
