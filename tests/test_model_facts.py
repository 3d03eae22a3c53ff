"""Inference never guesses what a model needs, and never trusts a checkpoint's fields (issue 8, cases 1, 2, 12).

A model.pt copied out of its run folder keeps its input size; a foreign state_dict needs --image-size;
every field of a checkpoint is validated before anything is allocated from it, with a one-line error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import png_header_only
from PIL import Image
from torchvision import models

from skinlesion.cli import main
from skinlesion.labels import CLASSES
from skinlesion.model import load_for_inference


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "lesion.jpg"
    Image.new("RGB", (60, 45), (150, 90, 70)).save(path)
    return path


def _predict(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[dict] | None, str]:
    code = main(["predict", "--json", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out)["results"] if out.strip() else None), err


def test_model_pt_copied_elsewhere_keeps_its_input_size(random_run: Path, tmp_path: Path) -> None:
    # Before: the facts lived in a config.yaml beside it, and a lone copy was preprocessed at 224 px.
    lone = tmp_path / "elsewhere" / "model.pt"
    lone.parent.mkdir()
    shutil.copy(random_run / "model.pt", lone)
    loaded = load_for_inference(lone)
    assert (loaded.arch, loaded.image_size) == ("resnet18", 32)
    # ... and it is still a plain state_dict that torchvision loads (the seed's format).
    models.resnet18(num_classes=7).load_state_dict(torch.load(lone, weights_only=True))


def test_model_pt_and_best_pt_give_the_same_probabilities(random_run: Path, image: Path, capsys) -> None:
    _, a, _ = _predict(capsys, "--checkpoint", str(random_run / "model.pt"), str(image))
    _, b, _ = _predict(capsys, "--checkpoint", str(random_run / "best.pt"), str(image))
    assert a == [dict(e, image=str(image)) for e in b]


def test_plain_state_dict_without_image_size_is_an_error_naming_the_fix(random_run: Path, image: Path, capsys) -> None:
    code, entries, err = _predict(capsys, "--checkpoint", str(random_run / "plain.pt"), str(image))
    assert code == 2 and entries is None
    assert "plain.pt is a plain state_dict that does not record its input size: pass --image-size" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    code, entries, _ = _predict(capsys, "--checkpoint", str(random_run / "plain.pt"), "--image-size", "32", str(image))
    assert code == 0 and entries[0]["predictions"]


def test_image_size_that_contradicts_the_checkpoint_is_refused(random_run: Path, image: Path, capsys) -> None:
    code, _, err = _predict(capsys, "--checkpoint", str(random_run / "best.pt"), "--image-size", "224", str(image))
    assert code == 2 and "--image-size 224 contradicts" in err and "trained at 32 px" in err


def _best(random_run: Path, path: Path, **changes: object) -> Path:
    payload = torch.load(random_run / "best.pt", weights_only=True)
    payload.update(changes)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 100000}, "image_size=100000 is not an integer from 16 to 1024"),
        ({"image_size": "64"}, "image_size='64' is not an integer"),
        ({"image_size": True}, "image_size=True is not an integer"),
        ({"arch": "os.system"}, "arch='os.system' is not one of resnet18"),
        ({"arch": "resnet50"}, "says arch='resnet50' but its weights are a resnet18"),
        # Classes are the checkpoint's own (any dataset's), but they must match its head.
        ({"classes": ["mel", "nv"], "malignant": ["mel"]}, "head of shape (7, 512), not 2 outputs (mel, nv)"),
        ({"classes": ["mel", "mel"]}, "is not a list of two or more distinct class codes"),
        ({"malignant": ["scc"]}, "malignant=['scc'] is not a list of its classes"),
    ],
)
def test_every_checkpoint_field_is_validated(random_run, image, tmp_path, capsys, changes, message) -> None:
    bad = _best(random_run, tmp_path / "best.pt", **changes)
    code, entries, err = _predict(capsys, "--checkpoint", str(bad), str(image))
    assert code == 2 and entries is None
    assert message in err and err.startswith(f"error: {bad}") and err.count("\n") == 1


def test_missing_fields_are_not_filled_in(random_run: Path, image: Path, tmp_path: Path, capsys) -> None:
    payload = torch.load(random_run / "best.pt", weights_only=True)
    del payload["image_size"]
    torch.save(payload, tmp_path / "best.pt")
    code, _, err = _predict(capsys, "--checkpoint", str(tmp_path / "best.pt"), str(image))
    assert code == 2 and "lacks ['image_size']" in err


def test_ten_class_head_is_refused(tmp_path: Path, image: Path, capsys) -> None:
    torch.save(models.resnet18(num_classes=10).state_dict(), tmp_path / "ten.pt")
    code, _, err = _predict(capsys, "--checkpoint", str(tmp_path / "ten.pt"), "--image-size", "32", str(image))
    assert code == 2 and "classifier head of shape (10, 512), not 7 outputs" in err


def test_weights_of_a_one_channel_model_name_the_tensor_not_torchs_empty_first_line(tmp_path, image, capsys) -> None:
    # Before: "does not load into resnet18: Error(s) in loading state_dict for ResNet:" and nothing more.
    model = models.resnet18(num_classes=7)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    torch.save(model.state_dict(), tmp_path / "grey.pt")
    code, _, err = _predict(capsys, "--checkpoint", str(tmp_path / "grey.pt"), "--image-size", "32", str(image))
    assert code == 2 and err.count("\n") == 1
    assert "conv1.weight [64, 1, 7, 7] (not [64, 3, 7, 7]); it looks like a resnet18 for 1-channel images" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello, I am a text file\n", "is not a PyTorch checkpoint"),
        (b"", "is not a PyTorch checkpoint"),
        (b"PK\x03\x04 a broken zip", "is not a readable PyTorch checkpoint"),
    ],
)
def test_files_that_are_not_checkpoints_get_one_line(tmp_path, image, capsys, content, message) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    for command in (
        ["predict", "--checkpoint", str(path), str(image)],
        ["evaluate", "--checkpoint", str(path), "--shards", str(tmp_path)],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err or "manifest.json" in err


def test_evaluate_never_guesses_the_input_size_either(random_run: Path, shards_dir: Path, capsys) -> None:
    assert main(["evaluate", "--checkpoint", str(random_run / "plain.pt"), "--shards", str(shards_dir)]) == 2
    assert "pass --image-size" in capsys.readouterr().err


def test_predict_rejects_the_decompression_bombs_prepare_rejects(random_run: Path, tmp_path: Path, capsys) -> None:
    # 90 megapixels: above PIL's limit but below twice it, where PIL only warns; prepare calls it a bomb.
    bomb = tmp_path / "big.png"
    bomb.write_bytes(png_header_only(10_000, 9_000))
    code, entries, _ = _predict(capsys, "--checkpoint", str(random_run / "best.pt"), str(bomb))
    assert code == 1 and entries[0]["error"].startswith("decompression bomb")


def test_classes_are_the_skinlesion_classes() -> None:
    assert CLASSES == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")  # the index order checkpoints rely on
