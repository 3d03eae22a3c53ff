"""prepare end to end on synthetic data: shards, manifest, rejected.csv, atomic output, bad images."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from helpers import small_options
from PIL import Image

from skinlesion.data.prepare import PrepareOptions, prepare
from skinlesion.errors import UserError
from skinlesion.labels import CLASSES


def _read_split(out: Path, split: str) -> list[dict]:
    """Every sample of a split, read straight from the tar files (no webdataset)."""
    samples: dict[str, dict] = {}
    manifest = json.loads((out / "manifest.json").read_text())
    for name in manifest["splits"][split]["files"]:
        with tarfile.open(out / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(f"{name}/{key}", {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def _all_image_ids(out: Path) -> set[str]:
    return {json.loads(s["json"])["image_id"] for split in ("train", "val", "test") for s in _read_split(out, split)}


def test_manifest_accounts_for_every_row(shards_dir: Path, synthetic_dir: Path) -> None:
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    rows = manifest["rows"]
    assert rows["input"] == len(pd.read_csv(synthetic_dir / "HAM10000_metadata.csv")) == 400
    assert rows["input"] == rows["kept"] + rows["rejected"]
    rejected = pd.read_csv(shards_dir / "rejected.csv")
    assert list(rejected.columns) == ["image_id", "reason"] and len(rejected) == rows["rejected"]
    assert rejected["reason"].value_counts().to_dict() == manifest["rejected_by_reason"]
    assert set(manifest["rejected_by_reason"]) == {"null age", "unknown sex", "unknown localization"}
    assert manifest["classes"] == list(CLASSES)
    assert manifest["image_size"] == 48 and manifest["seed"] == 0 and manifest["version"]
    assert manifest["args"]["samples_per_class"] == 40
    for split, info in manifest["splits"].items():
        assert info["files"] == [f"{split}-{i:06d}.tar" for i in range(info["shards"])]
        assert all((shards_dir / f).is_file() for f in info["files"])
        assert sum(info["shard_samples"]) == info["samples"] == sum(info["class_counts"].values())
        assert info["shards"] == min(4, info["samples"])  # min_shards=4
        assert max(info["shard_samples"]) - min(info["shard_samples"]) <= 1


def test_samples_have_the_contracted_keys_and_agree_with_manifest(shards_dir: Path) -> None:
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    for split in ("train", "val", "test"):
        samples = _read_split(shards_dir, split)
        assert len(samples) == manifest["splits"][split]["samples"]
        assert all(set(s) == {"__key__", "jpg", "cls", "json"} for s in samples)
        keys = [s["__key__"] for s in samples]
        assert len(set(keys)) == len(keys)  # unique within the split
        counts = Counter()
        for s in samples[:60]:
            meta = json.loads(s["json"])
            assert set(meta) == {"lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"}
            assert int(s["cls"].decode("ascii")) == CLASSES.index(meta["dx"])
            im = Image.open(io.BytesIO(s["jpg"]))
            assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) == 48
        for s in samples:
            counts[CLASSES[int(s["cls"])]] += 1
        assert counts == Counter({k: v for k, v in manifest["splits"][split]["class_counts"].items() if v})


def test_train_is_balanced_and_val_test_are_natural_and_lesion_disjoint(shards_dir: Path) -> None:
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    assert manifest["splits"]["train"]["class_counts"] == dict.fromkeys(CLASSES, 40)
    lesions = {}
    for split in ("train", "val", "test"):
        metas = [json.loads(s["json"]) for s in _read_split(shards_dir, split)]
        lesions[split] = {m["lesion_id"] for m in metas}
        if split != "train":  # each image once, natural class mix (nv the majority)
            ids = [m["image_id"] for m in metas]
            assert len(ids) == len(set(ids))
            dx = Counter(m["dx"] for m in metas)
            assert dx.most_common(1)[0][0] == "nv"
    assert not lesions["train"] & lesions["val"]
    assert not lesions["train"] & lesions["test"]
    assert not lesions["val"] & lesions["test"]


def test_resampled_copies_get_a_suffix(shards_dir: Path) -> None:
    train = _read_split(shards_dir, "train")
    by_image = Counter(json.loads(s["json"])["image_id"] for s in train)
    repeated = next(image_id for image_id, n in by_image.items() if n > 1)  # a small class was upsampled
    keys = sorted(s["__key__"] for s in train if json.loads(s["json"])["image_id"] == repeated)
    assert keys == sorted([repeated] + [f"{repeated}_r{i}" for i in range(1, by_image[repeated])])
    copies = [s["jpg"] for s in train if json.loads(s["json"])["image_id"] == repeated]
    assert len(set(copies)) == 1  # decoded once, the same bytes in every copy


def test_deterministic_for_a_seed_whatever_the_workers(synthetic_dir: Path, tmp_path: Path) -> None:
    opts = replace(small_options(synthetic_dir, tmp_path), samples_per_class=10)
    a = prepare(opts)
    b = prepare(replace(opts, out=tmp_path / "again", workers=2))
    assert a.manifest["splits"] == b.manifest["splits"]
    for name in a.manifest["splits"]["train"]["files"] + a.manifest["splits"]["test"]["files"]:
        assert (a.out / name).read_bytes() == (b.out / name).read_bytes()
    c = prepare(replace(opts, out=tmp_path / "other", seed=1))
    assert _read_split(c.out, "test") != _read_split(a.out, "test")


def test_existing_dataset_is_refused_unless_overwrite(synthetic_dir: Path, tmp_path: Path) -> None:
    opts = small_options(synthetic_dir, tmp_path, n=40)
    prepare(opts)
    with pytest.raises(UserError, match=r"is not empty .*; pass --overwrite to replace it"):
        prepare(opts)
    (opts.out / "README.md").write_text("keep me")  # a note the user added beside the dataset
    result = prepare(replace(opts, overwrite=True, image_size=24))
    assert result.manifest["image_size"] == 24
    assert (opts.out / "README.md").read_text() == "keep me"  # files prepare did not write survive
    assert not [p for p in opts.out.iterdir() if p.name.startswith((".partial", ".incomplete"))]  # no leftovers


def _truncate_one(opts: PrepareOptions) -> str:
    """Truncate the image of the first row that the cleaning rules keep; return its image_id."""
    rows = pd.read_csv(opts.metadata, dtype=str)
    clean = rows[rows["age"].notna() & (rows["sex"] != "unknown") & (rows["localization"] != "unknown")]
    victim = clean["image_id"].iloc[0]
    path = opts.images[0] / f"{victim}.jpg"
    path.write_bytes(path.read_bytes()[:2000])
    return victim


def test_bad_image_is_skipped_with_reason(synthetic_dir: Path, tmp_path: Path) -> None:
    opts = small_options(synthetic_dir, tmp_path, n=40)
    victim = _truncate_one(opts)
    result = prepare(opts)
    rejected = pd.read_csv(opts.out / "rejected.csv", dtype=str)
    assert rejected.set_index("image_id").loc[victim, "reason"] == "truncated image"
    assert result.manifest["rejected_by_reason"]["truncated image"] == 1
    assert result.manifest["rows"]["input"] == result.manifest["rows"]["kept"] + result.manifest["rows"]["rejected"]
    assert victim not in _all_image_ids(opts.out)


def test_bad_image_with_error_stops_and_writes_nothing(synthetic_dir: Path, tmp_path: Path) -> None:
    opts = replace(small_options(synthetic_dir, tmp_path, n=40), on_bad_image="error")
    victim = _truncate_one(opts)
    with pytest.raises(UserError, match=rf"{victim}\.jpg .*truncated image.*--on-bad-image"):
        prepare(opts)
    assert not opts.out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_samples_per_shard_caps_shard_size(synthetic_dir: Path, tmp_path: Path) -> None:
    result = prepare(replace(small_options(synthetic_dir, tmp_path), samples_per_shard=7, min_shards=1))
    for info in result.manifest["splits"].values():
        assert max(info["shard_samples"]) <= 7 and info["shards"] == -(-info["samples"] // 7)


def test_image_size_zero_keeps_original_bytes(synthetic_dir: Path, tmp_path: Path) -> None:
    result = prepare(replace(small_options(synthetic_dir, tmp_path, n=30), image_size=0, min_shards=1))
    sample = _read_split(result.out, "train")[0]
    image_id = json.loads(sample["json"])["image_id"]
    assert sample["jpg"] == (result.manifest["args"]["images"][0] / Path(f"{image_id}.jpg")).read_bytes()


def test_summary_table_is_printed_and_saved(shards_dir: Path) -> None:
    summary = (shards_dir / "summary.txt").read_text()
    assert summary.startswith("rows: 400 in,")
    assert all(word in summary for word in ("null age", "train", "val", "test", *CLASSES))
