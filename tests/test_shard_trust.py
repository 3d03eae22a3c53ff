"""A dataset is data, never instructions, and is checked before an epoch is spent on it (issue 8, cases 7-10).

Shard names are bare file names opened locally (no `pipe:` or URL ever reaches webdataset's opener);
a manifest is validated key by key and against its shards; empty splits are legal.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from skinlesion.cli import main


@pytest.fixture
def copy(shards_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shards_dir, out)
    return out


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _evaluate(capsys, checkpoint: Path, shards: Path | str, *extra: str) -> tuple[int, str]:
    code = main(["evaluate", "--checkpoint", str(checkpoint), "--shards", str(shards), *extra])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("name", ["pipe:touch PWNED;cat test-000000.tar", "../test-000000.tar", "s3://b/x.tar"])
def test_manifest_file_names_are_never_commands_or_urls(random_run, copy, monkeypatch, capsys, name) -> None:
    monkeypatch.chdir(copy)
    shutil.copy("test-000000.tar", name) if "/" not in name else None  # the file exists: only the name is hostile

    def point_at(manifest: dict) -> None:
        manifest["splits"]["test"]["files"][0] = name

    _edit_manifest(copy, point_at)
    code, err = _evaluate(capsys, random_run / "best.pt", ".")
    assert code == 2 and "splits.test.files holds" in err and "bare .tar file names" in err
    assert err.count("\n") == 1
    assert not Path("PWNED").exists()


def test_a_shards_folder_named_like_a_pipe_is_just_a_folder(random_run, copy, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "pipe:touch PWNED;cat "
    copy.rename(hostile)
    code, err = _evaluate(capsys, random_run / "best.pt", hostile.name, "--out", str(tmp_path / "eval"))
    assert code == 0, err
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("splits"), "'splits' must be an object"),
        (lambda m: m.update(splits=[1, 2]), "'splits' must be an object"),
        (lambda m: m["splits"]["test"].pop("files"), "splits.test.files holds None"),
        (lambda m: m["splits"]["test"].update(samples="56"), "splits.test.samples is '56', not a count"),
        (lambda m: m["splits"]["test"].update(shard_samples=[1]), "splits.test.shard_samples must list one"),
        (lambda m: m["splits"]["test"].update(samples=9999), "adds up to 56, but samples is 9999"),
        (lambda m: m.update(classes=["a"]), "'classes' is ['a']"),
        (lambda m: m.clear() or m.update(x=1), "'classes' is None"),
    ],
)
def test_malformed_manifest_is_one_line_naming_the_key(random_run, copy, capsys, edit, message) -> None:
    _edit_manifest(copy, edit)
    code, err = _evaluate(capsys, random_run / "best.pt", copy)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_manifest_that_is_not_json_is_one_line(random_run, copy, capsys) -> None:
    (copy / "manifest.json").write_bytes(b"\x00\xff\xfe binary")
    code, err = _evaluate(capsys, random_run / "best.pt", copy)
    assert code == 2 and "is not readable JSON" in err and err.count("\n") == 1


def test_manifest_claiming_more_samples_than_its_shards_hold_is_caught_up_front(random_run, copy, capsys) -> None:
    def inflate(manifest: dict) -> None:
        test = manifest["splits"]["test"]
        test["shard_samples"] = [n * 10 for n in test["shard_samples"]]
        test["samples"] = sum(test["shard_samples"])

    _edit_manifest(copy, inflate)
    code, err = _evaluate(capsys, random_run / "best.pt", copy)
    assert code == 2 and "test-000000.tar holds" in err and "manifest.json says" in err


@pytest.mark.parametrize("damage", ["truncate", "text"])
def test_a_damaged_shard_is_named(random_run, copy, capsys, damage) -> None:
    shard = copy / "test-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"just some text\n" * 100)
    code, err = _evaluate(capsys, random_run / "best.pt", copy)
    assert code == 2 and "test-000001.tar" in err and err.count("\n") == 1, err


def _rewrite_first_label(shard: Path, label: bytes) -> str:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".cls"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = label if member.name == victim else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return victim.split(".")[0]


def test_a_class_index_out_of_range_is_named_with_shard_and_key(random_run, copy, capsys) -> None:
    key = _rewrite_first_label(copy / "test-000002.tar", b"99")
    code, err = _evaluate(capsys, random_run / "best.pt", copy)
    assert code == 2 and f"test-000002.tar: sample '{key}' has class b'99'" in err


def test_empty_splits_prepare_and_evaluate_says_so(synthetic_dir, tmp_path, random_run, capsys) -> None:
    out = tmp_path / "novals"
    code = main(
        [
            "prepare",
            "--metadata",
            str(synthetic_dir / "HAM10000_metadata.csv"),
            "--images",
            str(synthetic_dir / "HAM10000_images_part_1"),
            "--images",
            str(synthetic_dir / "HAM10000_images_part_2"),
            "--out",
            str(out),
            "--image-size",
            "32",
            "--val-fraction",
            "0",
            "--min-shards",
            "2",
        ]
    )
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["val"] == manifest["splits"]["val"] | {"samples": 0, "files": [], "shard_samples": []}
    code, err = _evaluate(capsys, random_run / "best.pt", out, "--split", "val")
    assert code == 2 and "the 'val' split of" in err and "is empty (0 samples)" in err


def _swap_mel_and_nv(manifest: dict) -> None:
    """A hand edit: mel and nv swapped in `classes` and, consistently, in the dataset description."""
    i, j = manifest["classes"].index("mel"), manifest["classes"].index("nv")
    for codes in (manifest["classes"], manifest["dataset"]["classes"]):  # the description lists them in index order
        codes[i], codes[j] = codes[j], codes[i]


def test_classes_reordered_by_hand_disagree_with_the_shards_and_are_refused(copy) -> None:
    from skinlesion.data.manifest import read_manifest, verify_split
    from skinlesion.errors import UserError

    verify_split(copy, read_manifest(copy), "val")  # as prepared: fine
    _edit_manifest(copy, _swap_mel_and_nv)
    manifest = read_manifest(copy)  # consistent with itself ...
    with pytest.raises(UserError) as caught:
        verify_split(copy, manifest, "val")  # ... but not with the class codes its shards carry
    message = str(caught.value)
    assert message.startswith(f"{copy / 'manifest.json'}: classes[") and "re-run `skinlesion prepare`" in message
    assert "'mel'" in message and "'nv'" in message and "\n" not in message


@pytest.mark.parametrize(
    ("classes", "accepted"),
    [
        (["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], True),
        (["akiec", "bcc", "bkl", "df", "nv", "mel", "vasc"], False),
        (["other", "mel"], False),
    ],
    ids=["ham10000", "reordered", "isic2020"],
)
def test_a_manifest_without_a_dataset_is_hams_only_with_hams_classes(classes, accepted) -> None:
    from skinlesion.data.datasets import HAM10000, of_manifest
    from skinlesion.errors import UserError

    legacy = {"classes": classes, "splits": {}}
    if accepted:
        assert of_manifest(legacy) == HAM10000
        return
    with pytest.raises(UserError, match=r"^manifest\.json has no 'dataset' description, and its classes .* re-run"):
        of_manifest(legacy)


def test_train_refuses_a_manifest_without_a_dataset_before_making_its_folder(copy, tmp_path, capsys) -> None:
    from helpers import REPO

    def isic2020_without_dataset(manifest: dict) -> None:
        manifest.pop("dataset")
        manifest["classes"] = ["other", "mel"]

    _edit_manifest(copy, isic2020_without_dataset)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            str(REPO / "configs/smoke.yaml"),
            f"data.shards={copy}",
            f"train.output_dir={out}",
            "wandb.mode=disabled",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "manifest.json has no 'dataset' description" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_evaluate_and_the_card_say_when_images_were_split_without_grouping(random_run, copy, tmp_path) -> None:
    from accelerate import Accelerator

    from skinlesion.card import calibrate
    from skinlesion.data.manifest import UNGROUPED
    from skinlesion.evaluate import evaluate
    from skinlesion.model import load_for_inference

    def ungrouped_and_small(manifest: dict) -> None:
        manifest["groups"] = {"key": "image_id", "own_groups": manifest["rows"]["kept"], "ungrouped": True}
        for info in manifest["splits"].values():  # one shard a split: a cheap calibration
            info.update(files=info["files"][:1], shard_samples=info["shard_samples"][:1])
            info["samples"] = info["shard_samples"][0]

    _edit_manifest(copy, ungrouped_and_small)
    shutil.copy(random_run / "best.pt", tmp_path / "best.pt")
    loaded = load_for_inference(tmp_path / "best.pt")
    result = evaluate(loaded.model, Accelerator(cpu=True), copy, "test", 32, n_bootstrap=0, plots=False)
    assert result.metrics["split_notes"] == [UNGROUPED] and f"note: {UNGROUPED}" in result.summary()
    card = calibrate(loaded.model, tmp_path / "best.pt", copy, loaded.image_size, loaded.arch)
    assert UNGROUPED in card["limitations"]
