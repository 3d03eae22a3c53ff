"""W&B offline: the run under output_dir holds the logged history, the model and dataset artifacts, the
interactive charts and the most-confident-mistakes table, and a resumed run continues its id.

The offline run file (``run-<id>.wandb``) is a LevelDB-style log of protobuf records; `history` and
`_artifacts` read its records with W&B's own protobuf definitions, and the artifacts' files are read where
the records say they are staged, so the tests check what `wandb sync` would upload.
"""

from __future__ import annotations

import csv
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import metrics, run_train, tiny_shards

pytestmark = pytest.mark.slow
BLOCK, HEADER = 32768, 7


def history(run_file: Path) -> list[dict]:
    rows = []
    for record in _records(run_file):
        if record.HasField("history"):
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def _records(path: Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk = path.read_bytes(), HEADER, b""
    assert data[:4] == b":W&B"
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER]) if left >= HEADER else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        chunk += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_offline_run_holds_the_history_and_a_resumed_run_keeps_its_id(tmp_path: Path) -> None:
    shards, out = tiny_shards(tmp_path / "shards"), tmp_path / "run"
    assert run_train(out, shards, "wandb.mode=offline", "train.epochs=1").returncode == 0
    done = run_train(out, shards, "wandb.mode=offline", "train.epochs=2")  # resumes after epoch 0
    assert done.returncode == 0, done.stderr

    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    run_id = json.loads(next((out / "checkpoints").glob("step-*/trainer_state.json")).read_text())["wandb_run_id"]
    assert len(runs) == 2 and {p.stem for p in runs} == {f"run-{run_id}"}  # one W&B run, continued
    rows = history(runs[0]) + history(runs[1])
    losses = [r for r in rows if "train/loss" in r]
    assert [r["_step"] for r in losses] == list(range(1, 15))  # every step of both epochs (log_every_steps=1)
    assert all(r["train/lr"] > 0 and r["train/images_per_second"] > 0 for r in losses)
    val = [r for r in rows if "val/balanced_accuracy" in r]
    assert [r["epoch"] for r in val] == [0, 1]
    assert [r["val/loss"] for r in val] == [m["val_loss"] for m in metrics(out)]


def _artifacts(run_file: Path) -> list:
    return [record.artifact for record in _records(run_file) if record.HasField("artifact")]


def _charts(run_file: Path) -> dict[str, dict]:
    """{key: panel config} of the custom charts the run declared (config ``_wandb.visualize.<key>``)."""
    charts = {}
    for record in _records(run_file):
        for item in record.config.update if record.HasField("config") else []:
            if list(item.nested_key[:2]) == ["_wandb", "visualize"]:
                charts[item.nested_key[2]] = json.loads(item.value_json)["panel_config"]
    return charts


def _files(artifact) -> dict[str, Path]:
    return {entry.path: Path(entry.local_path) for entry in artifact.manifest.contents}


def _table(artifacts: list, name: str) -> tuple[dict, dict[str, Path]]:
    """The last logged version of table `name` (W&B stores each logged table as a run_table artifact)."""
    artifact = [a for a in artifacts if a.type == "run_table" and f"{name}.table.json" in _files(a)][-1]
    files = _files(artifact)
    return json.loads(files[f"{name}.table.json"].read_text()), files


def test_offline_run_carries_the_artifacts_the_charts_and_the_most_confident_mistakes(tmp_path: Path) -> None:
    from PIL import Image

    from skinlesion.labels import CLASSES
    from skinlesion.tracking_eval import MISTAKE_COLUMNS

    shards, out = tiny_shards(tmp_path / "shards"), tmp_path / "run"
    done = run_train(out, shards, "wandb.mode=offline", "train.epochs=1", "train.lr=1e-6")  # an untrained model errs
    assert done.returncode == 0, done.stderr
    assert "warning: W&B" not in done.stderr
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    artifacts = _artifacts(run_file)

    # The model artifact: best.pt, its card, ood.pt and the resolved config, aliased best and best.pt's epoch.
    (model,) = [a for a in artifacts if a.type == "model"]
    assert {"best", "epoch-0"} <= set(model.aliases) and not model.use_after_commit
    assert sorted(_files(model)) == ["best.pt", "config.yaml", "model_card.json", "ood.pt"]
    assert json.loads(model.metadata)["epoch"] == 0
    # The dataset artifact: the manifest, used by the run (lineage input), not produced by it.
    (dataset,) = [a for a in artifacts if a.type == "dataset"]
    assert dataset.use_after_commit and sorted(_files(dataset)) == ["manifest.json"]
    for artifact, folder in ((model, out), (dataset, shards)):
        for name, staged in _files(artifact).items():
            assert staged.read_bytes() == (folder / name).read_bytes()
    # Offline, every file that `wandb sync` will upload is inside the output folder.
    staged = [p for a in artifacts for p in _files(a).values()]
    assert staged and all(p.is_file() and p.is_relative_to(out) for p in staged)

    # Interactive charts for the best validation epoch and for test, beside the PNGs.
    charts = _charts(run_file)
    for split in ("val_best", "test"):
        assert charts[f"{split}/confusion_matrix_chart"]["panelDefId"] == "wandb/confusion_matrix/v1"
        assert charts[f"{split}/roc_chart"]["panelDefId"] == "wandb/area-under-curve/v0"
        roc, _ = _table(artifacts, f"{split}/roc_chart_table")
        assert {row[0] for row in roc["data"]} == set(CLASSES)  # every class has a curve
    for split, folder in (("val_best", "eval-val"), ("test", "eval")):
        cm, _ = _table(artifacts, f"{split}/confusion_matrix_chart_table")
        expected = json.loads((out / folder / "metrics.json").read_text())["confusion_matrix"]
        cells = {(actual, predicted): n for actual, predicted, n in cm["data"]}
        assert [[cells[t, p] for p in CLASSES] for t in CLASSES] == expected
    rows = history(run_file)
    assert [r["val_best/epoch"] for r in rows if "val_best/epoch" in r] == [0]
    assert any("test/confusion_matrix/path" in r for r in rows)  # the PNGs are still there

    # The most confident mistakes of the best epoch (one epoch: eval-val/ holds that epoch's predictions).
    table, files = _table(artifacts, "val_best/mistakes")
    assert table["columns"] == list(MISTAKE_COLUMNS)
    cm = json.loads((out / "eval-val" / "metrics.json").read_text())["confusion_matrix"]
    mistakes = sum(map(sum, cm)) - sum(cm[i][i] for i in range(len(CLASSES)))
    assert 0 < len(table["data"]) == min(32, mistakes)
    with (out / "eval-val" / "predictions.csv").open() as f:
        predicted_probs = {r["image"]: r for r in csv.DictReader(f)}
    probabilities = [row[5] for row in table["data"]]
    assert probabilities == sorted(probabilities, reverse=True)
    for image, key, image_id, true, predicted, probability, probability_true in table["data"]:
        index = int(key.removeprefix("val_"))  # tiny_shards: the class of sample i is i % 7
        assert image_id == f"ISIC_{index:07d}" and true == CLASSES[index % len(CLASSES)] and predicted != true
        assert probability == pytest.approx(float(predicted_probs[image_id][predicted.upper()]), abs=1e-6)
        assert probability_true == pytest.approx(float(predicted_probs[image_id][true.upper()]), abs=1e-6)
        with Image.open(files[image["path"]]) as thumbnail:
            assert image["_type"] == "image-file" and thumbnail.size == (36, 36)  # the shard's image (never enlarged)
