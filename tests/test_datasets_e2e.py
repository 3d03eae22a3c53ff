"""prepare -> train -> evaluate -> predict on synth's ISIC 2019 (8 classes) and ISIC 2020 (binary) layouts: the
classes travel from the dataset description through manifest.json into the head, the checkpoint, the card,
the metrics and the ISIC CSV; a checkpoint evaluated on shards with other classes is one line naming both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import env, run_train

from skinlesion.data.prepare import PrepareOptions, prepare
from skinlesion.data.synthetic_isic import (
    GT_2019,
    IMAGES_2019,
    META_2019,
    generate_isic,
)
from skinlesion.leaderboard import summarize

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "skinlesion", *args], capture_output=True, text=True, env=env(), timeout=300
    )


@pytest.fixture(scope="module")
def isic2019_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("e2e2019")
    generate_isic(root / "raw", "isic2019", n_images=200, seed=1, workers=1)
    opts = PrepareOptions(
        metadata=root / "raw" / META_2019,
        labels=root / "raw" / GT_2019,
        images=(root / "raw" / IMAGES_2019,),
        out=root / "shards",
        dataset="isic2019",
        image_size=32,
        samples_per_class=8,
        min_shards=1,
        workers=1,
    )
    prepare(opts)
    done = run_train(root / "run", root / "shards", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "shards", root / "run"


def test_isic2019_trains_an_eight_way_head_and_reports_eight_columns(isic2019_run: tuple[Path, Path]) -> None:
    shards, run = isic2019_run
    classes = ["ak", "bcc", "bkl", "df", "mel", "nv", "scc", "vasc"]
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["classes"] == classes and best["malignant"] == ["ak", "bcc", "mel", "scc"]
    assert best["model"]["fc.weight"].shape[0] == 8
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["classes"] == classes and len(metrics["confusion_matrix"]) == 8 and "binary" not in metrics
    header = (run / "eval" / "predictions.csv").read_text().splitlines()[0]
    assert header == "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"
    card = json.loads((run / "model_card.json").read_text())
    assert [c["dx"] for c in card["classes"]] == classes and card["dataset"] == "isic2019"
    assert card["risk"]["malignant_classes"] == ["ak", "bcc", "mel", "scc"]
    # The card speaks of this model's classes, not HAM10000's seven.
    assert "the 8 diagnostic categories of ISIC 2019" in card["intended_use"]
    assert any(line.startswith("Only the 8 ISIC 2019 categories") for line in card["limitations"])
    image = next((shards.parent / "raw" / IMAGES_2019).glob("*.jpg"))
    done = _cli("predict", "--checkpoint", str(run / "best.pt"), "--top-k", "8", "--json", str(image))
    assert done.returncode == 0, done.stderr
    predictions = json.loads(done.stdout)["results"][0]["predictions"]
    assert sorted(p["dx"] for p in predictions) == sorted(classes)
    assert next(p for p in predictions if p["dx"] == "scc")["name"] == "squamous cell carcinoma"
    done = _cli("predict", "--checkpoint", str(run / "best.pt"), "--top-k", "9", str(image))
    assert done.returncode == 2 and "--top-k 9: choose a number from 1 to 8" in done.stderr


def test_isic2020_is_scored_as_a_binary_task_and_other_classes_are_refused(
    isic2019_run: tuple[Path, Path], isic2020_data: tuple[Path, Path], tmp_path: Path
) -> None:
    _, shards = isic2020_data
    done = run_train(tmp_path / "run", shards, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "over patients" in done.stdout and "partial AUC above 80% sensitivity" in done.stdout
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["classes"] == ["other", "mel"] and metrics["group_key"] == "patient_id"
    assert metrics["binary"]["positive"] == "mel" and metrics["binary"]["auc"] == metrics["per_class"]["mel"]["auc"]
    assert (tmp_path / "run" / "eval" / "predictions.csv").read_text().splitlines()[0] == "image_name,target"
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["model"]["fc.weight"].shape[0] == 2
    assert best["metric"]["name"] == "val_auc"  # a binary task keeps the epoch with the best validation AUC
    # ... and says so: in the log, eval-val/metrics.json, metrics.jsonl and the card.
    assert "best.pt is kept by the highest val_auc on the validation split" in done.stdout
    val = json.loads((tmp_path / "run" / "eval-val" / "metrics.json").read_text())
    assert val["selection"]["metric"] == "val_auc" and val["selection"]["note"] is None
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["best_pt_metric"] for r in records} == {"val_auc"}
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    assert card["best_pt_selection"]["metric"] == "val_auc"
    assert all(isinstance(r["val_auc"], float) for r in records)  # the metric named is in every line
    assert card["validation"]["auc"] == card["best_pt_selection"]["value"] and len(card["validation"]["auc_ci95"]) == 2
    row = summarize(tmp_path)[0]  # a sweep folder of this one run: its leaderboard scores it by the AUC
    assert (row.metric, row.score, row.ranked) == ("val_auc", card["validation"]["auc"], True)
    assert "dx_type" not in metrics["subgroups"]  # ISIC 2020's diagnosis is the label, not how it was confirmed
    source, train = card["training_data"]["source"], card["training_data"]["splits"]["train"]
    assert source["dataset"] == "skinlesion synth (synthetic ISIC 2020-style pictures)"
    assert train["unit"] == "patients" and train["groups"] < source["groups"] and train["images"] < source["images"]

    _, run_2019 = isic2019_run
    done = _cli("evaluate", "--checkpoint", str(run_2019 / "best.pt"), "--shards", str(shards))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "['ak', 'bcc', 'bkl', 'df', 'mel', 'nv', 'scc', 'vasc']" in done.stderr
    assert "['other', 'mel']" in done.stderr


def test_init_from_fine_tunes_a_ham10000_checkpoint_on_isic2019(
    isic2019_run: tuple[Path, Path], random_run: Path, tmp_path: Path
) -> None:
    shards, _ = isic2019_run
    ham = torch.load(random_run / "best.pt", weights_only=True)
    done = run_train(tmp_path / "run", shards, f"train.init_from={random_run / 'best.pt'}", "train.epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "head rows of bcc, bkl, df, mel, nv, vasc from" in done.stdout and "new head rows: ak, scc" in done.stdout
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["classes"][0] == "ak" and best["model"]["fc.weight"].shape == (8, ham["model"]["fc.weight"].shape[1])
    done = run_train(tmp_path / "run2", shards, "train.init_from=model.pt", "model.pretrained=imagenet")
    assert done.returncode == 2 and "both initialise the model" in done.stderr


def test_a_card_for_other_classes_is_not_used(isic2019_run: tuple[Path, Path], tmp_path: Path) -> None:
    from skinlesion.model import load_for_inference
    from skinlesion.report import Calibration

    _, run = isic2019_run
    for name in ("best.pt", "model_card.json", "ood.pt"):
        (tmp_path / name).write_bytes((run / name).read_bytes())
    loaded = load_for_inference(tmp_path / "best.pt")
    matched = Calibration.load(tmp_path / "best.pt", loaded)
    assert matched.problem is None and matched.labels.classes == loaded.classes
    card = json.loads((tmp_path / "model_card.json").read_text())
    card["classes"] = [{"dx": dx, "name": dx, "malignant": dx == "mel"} for dx in ["other", "mel"]]
    card["risk"]["malignant_classes"] = ["mel"]
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    other = Calibration.load(tmp_path / "best.pt", loaded)
    assert other.card is None and "describes the classes ['other', 'mel'], not this checkpoint's" in other.problem
