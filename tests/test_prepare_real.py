"""prepare on the real HAM10000 metadata (../shared): 10,015 rows, 7,470 lesions, 9,761 kept by the seed's rules.

The 150 real images are used where they exist; every other row gets a tiny generated JPEG, so the
whole metadata goes through the pipeline. Skips when ../shared is absent.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from skinlesion.data import metadata
from skinlesion.data.prepare import PrepareOptions, PrepareResult, prepare


@pytest.fixture(scope="module")
def real_rows(shared_sample: Path) -> pd.DataFrame:
    return pd.read_csv(shared_sample / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def generated(shared_sample: Path, real_rows: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with an 8x6 JPEG for every row that has no real image."""
    folder = tmp_path_factory.mktemp("generated")
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (150, 100, 80)).save(buf, format="JPEG")
    real = {p.stem for p in (shared_sample / "images").glob("*.jpg")}
    for image_id in set(real_rows["image_id"]) - real:
        (folder / f"{image_id}.jpg").write_bytes(buf.getvalue())
    return folder


@pytest.fixture(scope="module")
def result(shared_sample: Path, generated: Path, tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    out = tmp_path_factory.mktemp("real") / "shards"
    opts = PrepareOptions(
        metadata=shared_sample / "HAM10000_metadata.csv",
        images=(shared_sample / "images", generated),
        out=out,
        image_size=16,
        seed=0,
    )
    return prepare(opts)


def _expected_reason(row: dict[str, str]) -> str | None:
    """The seed's rules, written out independently: null age first, then 'unknown' by column order."""
    if row["age"] == "":
        return "null age"
    return next((f"unknown {c}" for c, v in row.items() if v == "unknown"), None)


def test_rows_kept_and_rejected_match_the_seed_rules(result: PrepareResult, real_rows: pd.DataFrame) -> None:
    assert len(real_rows) == 10_015 and real_rows["lesion_id"].nunique() == 7_470
    rows = result.manifest["rows"]
    assert rows == {"input": 10_015, "kept": 9_761, "rejected": 254}
    expected = Counter(r for r in map(_expected_reason, real_rows.to_dict("records")) if r)
    assert result.manifest["rejected_by_reason"] == dict(expected)
    rejected = pd.read_csv(result.out / "rejected.csv", dtype=str)
    assert len(rejected) == 254 and rejected["image_id"].is_unique


def test_no_lesion_in_two_splits_and_70_15_15(result: PrepareResult, real_rows: pd.DataFrame) -> None:
    splits = result.manifest["splits"]
    metas = {s: _metas(result.out, info["files"]) for s, info in splits.items()}
    lesions = {s: {m["lesion_id"] for m in ms} for s, ms in metas.items()}
    assert not (
        lesions["train"] & lesions["val"] or lesions["train"] & lesions["test"] or lesions["val"] & lesions["test"]
    )
    ids = [m["image_id"] for ms in metas.values() for m in ms]
    assert len(ids) == len(set(ids)) == 9_761  # without --samples-per-class every kept image exactly once
    for split, share in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        assert splits[split]["samples"] / 9_761 == pytest.approx(share, abs=0.01)
        assert splits[split]["shards"] == 32  # the default serves 8 GPUs x 4 workers
    # Stratified: melanoma's share is the same in every split (within a point and a half).
    mel = {s: splits[s]["class_counts"]["mel"] / splits[s]["samples"] for s in splits}
    assert max(mel.values()) - min(mel.values()) < 0.015
    # Lesions with several images exist in the held-out splits, and stay whole there.
    test_lesions = Counter(m["lesion_id"] for m in metas["test"])
    kept_lesions = Counter(real_rows[real_rows["image_id"].isin(ids)]["lesion_id"])
    assert any(n > 1 for n in test_lesions.values())
    assert all(kept_lesions[lesion] == n for lesion, n in test_lesions.items())


def test_real_images_are_resized_rgb(result: PrepareResult, shared_sample: Path) -> None:
    real = {p.stem for p in (shared_sample / "images").glob("*.jpg")}
    found = 0
    for info in result.manifest["splits"].values():
        for name in info["files"]:
            with tarfile.open(result.out / name) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    if ext == "jpg" and key in real:
                        im = Image.open(io.BytesIO(tar.extractfile(member).read()))
                        assert im.mode == "RGB" and im.size == (21, 16)  # 600x450 -> shorter side 16
                        found += 1
    assert found == len(real - {r for r in real if r in _rejected(result.out)})


def test_keep_incomplete_keeps_every_row(shared_sample: Path, generated: Path) -> None:
    meta = metadata.load(shared_sample / "HAM10000_metadata.csv", [shared_sample / "images", generated], True)
    assert len(meta.kept) == 10_015 and not meta.rejected


def _rejected(out: Path) -> set[str]:
    return set(pd.read_csv(out / "rejected.csv", dtype=str)["image_id"])


def _metas(out: Path, files: list[str]) -> list[dict]:
    metas = []
    for name in files:
        with tarfile.open(out / name) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return metas
