"""predict on an original image file gives evaluate's probabilities for that image's shard (issue 22, point 5).

A shard image is the original after prepare's steps (orient, convert, resize to --image-size, JPEG at the
manifest's quality); evaluate resizes it again and centre-crops. Predict and serve once resized the original
straight to the model's input: on the real sample that moved malignant probabilities by up to 0.01 and
flipped 2 of 150 out-of-distribution flags (docs/evaluation.md#one-preprocessing). Now the checkpoint carries
the shard size and JPEG quality, and a file takes prepare's steps, then evaluate's.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from fastapi.testclient import TestClient
from PIL import Image

from skinlesion import inference
from skinlesion.cli import main
from skinlesion.data.manifest import read_manifest
from skinlesion.data.transforms import decode, eval_crop
from skinlesion.errors import UserError
from skinlesion.evaluate import collect_predictions
from skinlesion.facts import ModelFacts
from skinlesion.model import load_for_inference
from skinlesion.predict import predict_images
from skinlesion.serve import Settings, create_app


@pytest.fixture(scope="module")
def with_facts(random_run: Path, shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random run's best.pt (32-px input) saying it was trained on `shards_dir` (48-px shards, JPEG 90).

    The facts are written as plain keys, as training writes them: code that ignores them (the code before
    this change) reads the same file and takes the old path, so the parity test fails there."""
    manifest = read_manifest(shards_dir)
    payload = torch.load(random_run / "best.pt", weights_only=True)
    payload |= {"shard_size": manifest["image_size"], "jpeg_quality": manifest["jpeg_quality"]}
    path = tmp_path_factory.mktemp("facts") / "best.pt"
    torch.save(payload, path)
    return path


def _test_split(shards_dir: Path, synthetic_dir: Path) -> tuple[dict[str, bytes], dict[str, Path]]:
    """image_id -> (the JPEG bytes prepare stored, the original file) for the test split."""
    stored = {}
    for name in read_manifest(shards_dir)["splits"]["test"]["files"]:
        with tarfile.open(shards_dir / name) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "json":
                    image_id = json.loads(tar.extractfile(member).read())["image_id"]
                    stored[image_id] = tar.extractfile(f"{key}.jpg").read()
    originals = {p.stem: p for p in synthetic_dir.glob("HAM10000_images_part_*/*.jpg") if p.stem in stored}
    assert len(originals) == len(stored) > 10
    return stored, originals


def test_manifest_records_the_jpeg_quality_and_training_copies_it_into_the_facts(shards_dir: Path) -> None:
    manifest = read_manifest(shards_dir)
    assert (manifest["image_size"], manifest["jpeg_quality"]) == (48, 90)
    facts = ModelFacts("resnet18", ("a", "b"), 32).stored_as(manifest, "m.json")
    assert (facts.shard_size, facts.jpeg_quality) == (48, 90)
    assert ModelFacts.check(facts.to_dict(), Path("best.pt")) == facts  # what best.pt / model.pt carry reads back
    old = {k: v for k, v in manifest.items() if k != "jpeg_quality"}  # prepared before the quality was recorded
    assert ModelFacts("resnet18", ("a", "b"), 32).stored_as(old, "m.json").shard_size is None  # not guessed
    with pytest.raises(UserError, match=r"m\.json: jpeg_quality=900 is not an integer from 1 to 100"):
        ModelFacts("resnet18", ("a", "b"), 32).stored_as(manifest | {"jpeg_quality": 900}, "m.json")


def test_a_file_reaches_the_model_as_the_very_pixels_evaluate_gives_its_shard(shards_dir, synthetic_dir) -> None:
    manifest = read_manifest(shards_dir)
    stored, originals = _test_split(shards_dir, synthetic_dir)
    crop = eval_crop(32)
    for image_id, path in originals.items():
        pixels, (width, height) = inference.file_to_input(
            path.read_bytes(), 32, manifest["image_size"], manifest["jpeg_quality"]
        )
        assert torch.equal(pixels, crop(stored[image_id])), image_id
        assert min(width, height) == 48  # the crop box is that of the shard-sized image


def test_predict_on_original_files_gives_evaluates_probabilities(with_facts, shards_dir, synthetic_dir) -> None:
    _, originals = _test_split(shards_dir, synthetic_dir)
    loaded = load_for_inference(with_facts)
    evaluated = collect_predictions(loaded.model, Accelerator(cpu=True), shards_dir, "test", loaded.image_size)
    entries = predict_images(loaded, [originals[i] for i in evaluated.image_ids], top_k=len(loaded.classes))
    predicted = [[{p["dx"]: p["probability"] for p in e["predictions"]}[c] for c in loaded.classes] for e in entries]
    # The old path (one resize of the original) differed here by 0.088 (seen before the change); the same
    # pixels differ by nothing but the float rounding of another batch composition.
    assert abs(torch.tensor(predicted, dtype=torch.float64) - torch.from_numpy(evaluated.probs)).max() < 1e-5


def test_serve_takes_the_same_path_and_outlines_the_shards_crop(with_facts, shards_dir, synthetic_dir) -> None:
    stored, originals = _test_split(shards_dir, synthetic_dir)
    path = sorted(originals.values())[0]
    (predicted,) = predict_images(load_for_inference(with_facts), [path], top_k=7)
    with TestClient(create_app(Settings(with_facts)), base_url="http://127.0.0.1:8000") as client:
        (served,) = client.post("/api/predict", files=[("files", (path.name, path.read_bytes()))]).json()
        card = client.get("/api/model").json()
    by_dx = {p["dx"]: p["probability"] for p in predicted["predictions"]}
    assert all(abs(p["probability"] - by_dx[p["dx"]]) < 1e-6 for p in served["predictions"])
    height, width = decode(stored[path.stem]).shape[-2:]  # 63 x 48: prepare's draft decode rounds the 600x450
    assert served["crop"] == inference.crop_box(width, height)
    assert card["preprocessing"]["shard_size"] == 48 and card["preprocessing"]["note"] is None


def test_a_checkpoint_without_the_shard_facts_falls_back_and_says_so_once(random_run, with_facts, tmp_path, capsys):
    paths = [tmp_path / f"{i}.png" for i in range(2)]
    for path in paths:
        Image.new("RGB", (40, 30), (150, 90, 70)).save(path)
    assert main(["predict", "--checkpoint", str(random_run / "best.pt"), *map(str, paths)]) == 0
    assert capsys.readouterr().out.count("does not record its training shards' size and JPEG quality") == 1
    assert main(["predict", "--checkpoint", str(random_run / "best.pt"), str(paths[0]), "--json"]) == 0
    preprocessing = json.loads(capsys.readouterr().out)["model"]["preprocessing"]
    assert preprocessing["shard_size"] is None and "resized straight to the model's input" in preprocessing["note"]
    assert main(["predict", "--checkpoint", str(with_facts), str(paths[0]), "--json"]) == 0
    preprocessing = json.loads(capsys.readouterr().out)["model"]["preprocessing"]
    assert preprocessing == {"image_size": 32, "shard_size": 48, "jpeg_quality": 90, "note": None}


@pytest.mark.parametrize(("key", "value"), [("shard_size", 5), ("jpeg_quality", "90"), ("jpeg_quality", True)])
def test_a_checkpoint_with_bad_shard_facts_is_refused_in_one_line(random_run, tmp_path, key, value) -> None:
    payload = torch.load(random_run / "best.pt", weights_only=True) | {key: value}
    torch.save(payload, tmp_path / "best.pt")
    with pytest.raises(UserError, match=re.escape(f"best.pt: {key}={value!r} is not")):
        load_for_inference(tmp_path / "best.pt")
