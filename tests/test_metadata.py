"""metadata.load: every CSV row is matched to one image file or recorded as rejected with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from skinlesion.cli import main
from skinlesion.data import metadata
from skinlesion.data.metadata import read_csv
from skinlesion.errors import UserError

HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization,dataset"


def _jpeg(path: Path, color: tuple[int, int, int] = (120, 80, 60)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path, format="JPEG")


def _csv(path: Path, rows: list[str], newline: str = "\n") -> Path:
    path.write_text(newline.join([HEADER, *rows]) + newline, encoding="utf-8")
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, tuple[Path, Path]]:
    """A CSV with one row for every rule, and two image folders (CRLF line ends, as HAM10000's)."""
    a, b = tmp_path / "part_1", tmp_path / "part_2"
    for name in ("ok1", "ok2", "dup", "baddx", "age", "sex", "site", "same", "differ", "nolesion", "badage"):
        _jpeg(a / f"{name}.jpg")
    _jpeg(b / "ok3.jpg")
    _jpeg(b / "same.jpg")  # identical bytes in both folders: fine
    _jpeg(b / "differ.jpg", color=(10, 200, 10))  # different bytes: which one is the image?
    _jpeg(b / "orphan.jpg")  # an image without a row: ignored
    rows = [
        "L1,ok1,nv,histo,45,male,back,vidir_modern",
        "L1,ok2,nv,histo,45,male,back,vidir_modern",
        "L2,ok3,MEL,histo,60.0,female,face,rosendahl",  # dx in capitals is still mel
        "L3,dup,bkl,histo,50,male,back,rosendahl",
        "L3,dup,bkl,histo,50,male,back,rosendahl",
        "L4,baddx,scc,histo,50,male,back,rosendahl",
        "L5,age,nv,histo,,male,back,rosendahl",
        "L6,sex,nv,histo,50,unknown,back,rosendahl",
        "L7,site,nv,histo,50,male,unknown,rosendahl",
        "L8,missing,nv,histo,50,male,back,rosendahl",
        "L9,same,df,histo,50,male,back,rosendahl",
        "L10,differ,df,histo,50,male,back,rosendahl",
        ",nolesion,df,histo,50,male,back,rosendahl",
        "L11,badage,df,histo,fifty,male,back,rosendahl",
    ]
    return _csv(tmp_path / "meta.csv", rows, newline="\r\n"), (a, b)


def test_each_fault_is_recorded_with_its_reason(dataset: tuple[Path, tuple[Path, Path]]) -> None:
    csv, folders = dataset
    meta = metadata.load(csv, folders)
    reasons = {(r.image_id, r.reason) for r in meta.rejected}
    assert reasons == {
        ("dup", metadata.DUPLICATE),
        ("baddx", metadata.INVALID_DX),
        ("age", metadata.NULL_AGE),
        ("sex", "unknown sex"),
        ("site", "unknown localization"),
        ("missing", metadata.MISSING_IMAGE),
        ("differ", metadata.CONFLICTING_COPIES),
        ("nolesion", metadata.MISSING_LESION_ID),
        ("badage", metadata.INVALID_AGE),
    }
    assert sorted(meta.kept["image_id"]) == ["dup", "ok1", "ok2", "ok3", "same"]  # the first `dup` row is kept
    assert meta.n_input == 14 == len(meta.kept) + len(meta.rejected)
    assert "orphan" not in set(meta.kept["image_id"])
    paths = dict(zip(meta.kept["image_id"], meta.kept["path"], strict=True))
    assert Path(paths["ok3"]).parent == folders[1] and Path(paths["same"]).parent == folders[0]
    assert meta.kept.set_index("image_id").loc["ok3", "dx"] == "mel"


def test_keep_incomplete_keeps_null_age_and_unknown_but_not_faults(dataset: tuple[Path, tuple[Path, Path]]) -> None:
    csv, folders = dataset
    meta = metadata.load(csv, folders, keep_incomplete=True)
    assert {"age", "sex", "site"} <= set(meta.kept["image_id"])
    assert {r.reason for r in meta.rejected} == {
        metadata.DUPLICATE,
        metadata.INVALID_DX,
        metadata.MISSING_IMAGE,
        metadata.CONFLICTING_COPIES,
        metadata.MISSING_LESION_ID,
        metadata.INVALID_AGE,
    }
    row = meta.kept.set_index("image_id").loc["age"].to_dict()
    assert metadata.sample_metadata(row)["age"] is None


def test_sample_metadata_types() -> None:
    row = dict(zip(HEADER.split(","), ["L1", "ok1", "nv", "histo", "45", "male", "back", "vidir_modern"], strict=True))
    meta = metadata.sample_metadata({**row, "path": "/x/ok1.jpg"})
    assert meta == {**row, "age": 45.0}  # no path leaks into the shards


def test_same_folder_twice_is_not_a_conflict(tmp_path: Path) -> None:
    _jpeg(tmp_path / "imgs" / "a.jpg")
    csv = _csv(tmp_path / "m.csv", ["L1,a,nv,histo,40,male,back,x"])
    meta = metadata.load(csv, [tmp_path / "imgs", tmp_path / "imgs"])
    assert list(meta.kept["image_id"]) == ["a"] and not meta.rejected


def test_png_and_nested_folders_are_indexed(tmp_path: Path) -> None:
    _jpeg(tmp_path / "imgs" / "sub" / "a.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "b.PNG")
    csv = _csv(tmp_path / "m.csv", ["L1,a,nv,histo,40,male,back,x", "L2,b,nv,histo,40,male,back,x"])
    assert len(metadata.load(csv, [tmp_path / "imgs"]).kept) == 2


def test_csv_without_needed_columns_is_a_clear_error(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("image,diagnosis\nISIC_1,nv\n")
    with pytest.raises(UserError, match=r"m\.csv lacks the column\(s\) lesion_id, image_id, dx"):
        read_csv(csv)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), (b"", "is empty"), (b"\xff\xfe\x00bad\x81\xff", "not UTF-8"), ("dir", "is a folder")],
    ids=["missing", "empty", "binary", "folder"],
)
def test_unreadable_csv_is_a_clear_error(tmp_path: Path, content: bytes | str | None, message: str) -> None:
    csv = tmp_path / "HAM10000_metadata.csv"
    if content == "dir":
        csv.mkdir()
    elif content is not None:
        csv.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        read_csv(csv)
    assert str(csv) in str(info.value)


def test_missing_image_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"image folder .*nope does not exist"):
        metadata.index_images([tmp_path / "nope"])


@pytest.mark.parametrize("fault", ["missing-csv", "bad-columns", "missing-images"])
def test_cli_prints_one_line_error_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture, fault: str) -> None:
    csv = tmp_path / "m.csv"
    if fault != "missing-csv":
        csv.write_text("a,b\n1,2\n" if fault == "bad-columns" else f"{HEADER}\n")
    images = tmp_path / ("nope" if fault == "missing-images" else "imgs")
    if fault != "missing-images":
        images.mkdir()
    code = main(["prepare", "--metadata", str(csv), "--images", str(images), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_ham10000_csv_without_lesion_id_needs_allow_ungrouped(tmp_path: Path) -> None:
    _jpeg(tmp_path / "imgs" / "a.jpg")
    _jpeg(tmp_path / "imgs" / "b.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text(
        "image_id,dx,dx_type,age,sex,localization,dataset\na,nv,histo,40,male,back,x\nb,mel,histo,40,male,back,x\n"
    )
    with pytest.raises(
        UserError, match=r"m\.csv has no group column 'lesion_id' \(it has: image_id, dx, .*--allow-ungrouped"
    ):
        metadata.load(csv, [tmp_path / "imgs"])
    loaded = metadata.load(csv, [tmp_path / "imgs"], allow_ungrouped=True)
    assert loaded.ungrouped and loaded.own_groups == 2 and list(loaded.kept["lesion_id"]) == ["a", "b"]
    with pytest.raises(UserError, match=r"--allow-ungrouped: .* has the group column 'lesion_id'.*drop the flag"):
        metadata.load(
            _csv(tmp_path / "n.csv", ["L1,a,nv,histo,40,male,back,x"]), [tmp_path / "imgs"], allow_ungrouped=True
        )
