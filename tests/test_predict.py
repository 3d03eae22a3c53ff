"""`skinlesion predict`: the JSON contract, error entries, safe checkpoint loading, batching and TTA."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skinlesion.cli import main
from skinlesion.inference import class_probabilities, dihedral_views
from skinlesion.labels import CLASSES, MALIGNANT, NAMES
from skinlesion.model import load_for_inference
from skinlesion.predict import DISCLAIMER, predict_images


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A JPEG, an RGBA PNG and a grayscale JPEG of different sizes."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = [folder / "a.jpg", folder / "b.png", folder / "c.jpg"]
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 255, (64, 48, 4), dtype=np.uint8), "RGBA").save(paths[1])
    Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8), "L").save(paths[2])
    return paths


def _predict_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict]]:
    code = main(["predict", *args, "--json"])
    document = json.loads(capsys.readouterr().out)
    assert document["disclaimer"] == DISCLAIMER and set(document["model"]) >= {"checkpoint", "banner"}
    return code, document["results"]


def test_json_contract_top7_sums_to_one_and_keeps_order(random_run, images, capsys):
    order = [images[2], images[0], images[1]]
    checkpoint = str(random_run / "model.pt")
    code, entries = _predict_json(capsys, "--checkpoint", checkpoint, *map(str, order), "--top-k", "7")
    assert code == 0
    assert [e["image"] for e in entries] == [str(p) for p in order]
    for entry in entries:
        preds = entry["predictions"]
        assert sorted(p["dx"] for p in preds) == sorted(CLASSES)
        assert all(p["name"] == NAMES[p["dx"]] for p in preds)
        probs = [p["probability"] for p in preds]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        malignant = sum(p["probability"] for p in preds if p["dx"] in MALIGNANT)
        assert entry["malignant_probability"] == pytest.approx(malignant, abs=1e-6)


def test_top_k_limits_the_list_and_text_mode_names_diagnoses(random_run, images, capsys):
    code, entries = _predict_json(capsys, "--checkpoint", str(random_run / "model.pt"), str(images[0]), "--top-k", "2")
    assert code == 0 and len(entries[0]["predictions"]) == 2
    assert main(["predict", "--checkpoint", str(random_run / "model.pt"), str(images[0])]) == 0
    text = capsys.readouterr().out
    top = entries[0]["predictions"][0]
    assert f"1. {top['dx']}: {top['name']}" in text
    assert "malignant (akiec + bcc + mel)" in text and DISCLAIMER in text


def test_top_k_defaults_to_every_class_of_a_binary_model_and_an_explicit_larger_one_is_refused(
    binary_run, images, capsys
):
    checkpoint = str(binary_run / "best.pt")
    code, entries = _predict_json(capsys, "--checkpoint", checkpoint, str(images[0]))
    assert code == 0 and sorted(p["dx"] for p in entries[0]["predictions"]) == ["mel", "other"]
    assert main(["predict", "--checkpoint", checkpoint, str(images[0])]) == 0
    assert "malignant (mel)" in capsys.readouterr().out
    assert main(["predict", "--checkpoint", checkpoint, str(images[0]), "--top-k", "3"]) == 2
    assert "--top-k 3: choose a number from 1 to 2" in capsys.readouterr().err


def test_missing_and_corrupt_images_get_error_entries_and_exit_1(random_run, images, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(images[0].read_bytes()[:300])
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    missing = tmp_path / "missing.jpg"
    paths = [missing, images[0], corrupt, truncated, text]
    code, entries = _predict_json(capsys, "--checkpoint", str(random_run / "model.pt"), *map(str, paths))
    assert code == 1
    assert [e["image"] for e in entries] == [str(p) for p in paths]
    assert entries[0]["error"] == "file not found"
    assert "predictions" in entries[1] and "error" not in entries[1]
    assert entries[2]["error"].startswith(("corrupt image", "truncated image"))
    assert entries[3]["error"].startswith("truncated image")
    assert entries[4]["error"].startswith("corrupt image: no image format recognised")
    assert not any("predictions" in e for e in entries[2:])


def test_checkpoint_whose_unpickling_runs_code_is_refused(tmp_path, images, capsys):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Exploit()}, evil)
    code = main(["predict", "--checkpoint", str(evil), str(images[0])])
    assert code == 2
    assert not marker.exists()
    assert "refusing to load" in capsys.readouterr().err


def test_model_pt_and_best_pt_give_the_same_predictions(random_run, images, capsys):
    _, from_state_dict = _predict_json(capsys, "--checkpoint", str(random_run / "model.pt"), str(images[0]))
    _, from_best = _predict_json(capsys, "--checkpoint", str(random_run / "best.pt"), str(images[0]))
    assert from_state_dict == from_best
    loaded = load_for_inference(random_run / "model.pt")
    assert (loaded.arch, loaded.image_size) == ("resnet18", 32)  # read off the keys and config.yaml


def test_batched_equals_one_at_a_time(random_run, images):
    loaded = load_for_inference(random_run / "best.pt")
    batched = predict_images(loaded, images, top_k=7, batch_size=8)
    single = predict_images(loaded, images, top_k=7, batch_size=1)
    for a, b in zip(batched, single, strict=True):
        assert [p["dx"] for p in a["predictions"]] == [p["dx"] for p in b["predictions"]]
        np.testing.assert_allclose(
            [p["probability"] for p in a["predictions"]], [p["probability"] for p in b["predictions"]], atol=1e-5
        )


def test_tta_averages_the_eight_dihedral_views_and_is_rotation_invariant(random_run):
    model = load_for_inference(random_run / "best.pt").model
    x = torch.randn(2, 3, 32, 32)
    views = list(dihedral_views(x))
    assert len(views) == 8 and not any(torch.equal(a, b) for a, b in itertools.combinations(views, 2))
    tta = class_probabilities(model, x, tta=True)
    expected = torch.stack([class_probabilities(model, v) for v in views]).mean(0)
    torch.testing.assert_close(tta, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        class_probabilities(model, torch.rot90(x, 1, (-2, -1)), tta=True), tta, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(class_probabilities(model, x.flip(-2), tta=True), tta, atol=1e-5, rtol=0)


def test_predict_imports_no_training_tracking_or_metrics_packages(random_run, images) -> None:
    """Start-up is most of a short predict run: its process must not import accelerate, W&B, pandas,
    scikit-learn or matplotlib (the model card it reads lives in card.py, beside the metrics code)."""
    import subprocess
    import sys

    from helpers import REPO

    probe = (
        "import sys; from skinlesion.cli import main; code = main(sys.argv[1:]); "
        "print(sorted(m for m in ('accelerate', 'wandb', 'pandas', 'sklearn', 'matplotlib') if m in sys.modules))"
    )
    args = ["predict", "--checkpoint", str(random_run / "best.pt"), str(images[0])]
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
