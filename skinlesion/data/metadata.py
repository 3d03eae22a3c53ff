"""Read and validate the metadata CSV, match each row to one image file, clean as the seed did.

The seed's notebook copied HAM10000_images_part_1 and _part_2 into one folder (combine_folders),
then dropped rows with a null age or an 'unknown' value. Here the folders are indexed instead of
copied (one scan each), and every row that does not make it is recorded with its reason, so that
rows in == rows kept + rows rejected always holds and nothing disappears silently.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from skinlesion.data import layouts
from skinlesion.data.datasets import HAM10000, HAM10000_TO_ISIC2019, Dataset
from skinlesion.errors import UserError

COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset")
REQUIRED = ("lesion_id", "image_id", "dx")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_NULLS = {"", "nan", "null", "none", "na", "n/a"}

# Row faults (always rejected), in the order they are checked; the first that applies is recorded.
MISSING_IMAGE_ID = "missing image_id"
DUPLICATE = "duplicate image_id"
MISSING_LESION_ID = "missing lesion_id"
MISSING_IMAGE = "missing image"
CONFLICTING_COPIES = "different files with the same image_id"
ALREADY_IN_ISIC2019 = "HAM10000 image already in the ISIC 2019 files (same image_id)"
INVALID_AGE = "invalid age"
# Cleaning (the seed's rules; kept with --keep-incomplete): "null age" and "unknown <column>".
NULL_AGE = "null age"


def unknown(column: str) -> str:
    return f"unknown {column}"


def invalid_dx(n_classes: int) -> str:
    return f"dx not one of the {n_classes} classes"


INVALID_DX = invalid_dx(len(HAM10000.classes))


@dataclass(frozen=True)
class Rejection:
    image_id: str
    reason: str


@dataclass
class Metadata:
    """The outcome of reading and cleaning: kept rows (with their image path) and rejections."""

    kept: pd.DataFrame  # the CSV's known columns as text, plus `path`
    rejected: list[Rejection]
    n_input: int
    own_groups: int = 0  # kept rows without a group id, each made its own group (ISIC 2019's old archive)
    ungrouped: bool = False  # no group column at all (--allow-ungrouped): every image is its own group
    duplicates_listed: int = 0  # pairs in the duplicates file, when one was given
    added: dict[str, int] | None = None  # --add-ham10000: its rows, and those dropped as already in ISIC 2019


def read_csv(path: Path, allow_ungrouped: bool = False) -> pd.DataFrame:
    """The HAM10000 CSV as text columns (empty string for blanks), or a UserError saying what is wrong with it.

    Without lesion_id it is read only with `allow_ungrouped` (see `layouts.check_group`)."""
    path = Path(path)
    df = layouts.read_text_csv(path, "metadata CSV", "pass HAM10000_metadata.csv with --metadata")
    missing = [c for c in REQUIRED if c not in df.columns and not (c == "lesion_id" and allow_ungrouped)]
    if missing == ["lesion_id"] or allow_ungrouped:  # only the group column is absent: the flag is the way out
        layouts.check_group(df.columns, HAM10000, path, allow_ungrouped)
    if missing:
        raise UserError(
            f"metadata CSV {path} lacks the column(s) {', '.join(missing)} (it has: {', '.join(df.columns)}); "
            f"a HAM10000 metadata CSV has the header {','.join(COLUMNS)}{_layout_hint(df.columns)}"
        )
    known = [c for c in COLUMNS if c in df.columns]
    return df[known]


def _layout_hint(columns: Iterable[str]) -> str:
    """A pointer to the --dataset whose published layout these columns are."""
    have = set(columns)
    if {"image_name", "patient_id", "target"} <= have:
        return " (this is ISIC 2020's layout: pass --dataset isic2020)"
    if {"image", "age_approx", "anatom_site_general", "lesion_id"} <= have:
        return " (this is ISIC 2019's metadata: pass --dataset isic2019 with --labels GROUND_TRUTH.csv)"
    return " (for another dataset, pass --dataset isic2019|isic2020|custom)"


def index_images(folders: Iterable[Path]) -> dict[str, list[str]]:
    """Image files under the folders by name without extension: one scan per folder, no copying.

    Paths are plain strings: building 10,000 Path objects costs more than the scan itself.
    """
    index: dict[str, list[str]] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise UserError(f"image folder {folder} {what}; pass folders of <image_id>.jpg files with --images")
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                    index.setdefault(stem, []).append(os.path.join(root, name))
    return index


def _pick(paths: list[str]) -> str | None:
    """The one file behind an image_id, or None when copies in several places differ.

    The same file reached twice (a folder passed twice, a symlink) or byte-identical copies are
    fine, as in combine_folders where a later copy overwrote an identical one.
    """
    unique: list[str] = []
    for p in paths:
        if not any(os.path.samefile(p, q) for q in unique):
            unique.append(p)
    if len(unique) == 1:
        return unique[0]
    if len({os.stat(p).st_size for p in unique}) > 1:
        return None
    digests = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in unique}
    return unique[0] if len(digests) == 1 else None


def _age_fault(age: str) -> str | None:
    if age.lower() in _NULLS:
        return NULL_AGE
    try:
        value = float(age)
    except ValueError:
        return INVALID_AGE
    return INVALID_AGE if not 0 <= value <= 150 else None


def load(
    csv: Path,
    folders: Iterable[Path],
    keep_incomplete: bool = False,
    dataset: Dataset = HAM10000,
    labels: Path | None = None,
    duplicates: Path | None = None,
    add_ham10000: Path | None = None,
    allow_ungrouped: bool = False,
) -> Metadata:
    """Read csv (and the ground-truth and duplicates files of layouts that have them), match its rows to
    files in folders and apply the dataset's cleaning rules.

    A row with an empty group id in an existing group column is rejected, or with ``missing_group: own``
    kept as its own group and counted (`Metadata.own_groups`); a CSV without the group column is an error
    unless `allow_ungrouped` (then `Metadata.ungrouped`: every image is its own group)."""
    index = index_images(folders)  # first, so a wrong --images fails before any work
    n_pairs = 0
    if dataset.layout == "ham10000" and labels is None and duplicates is None:
        df = read_csv(csv, allow_ungrouped)
        df["dx"] = df["dx"].str.lower()
        df[layouts.FAULT] = ""
        grouped = "lesion_id" in df.columns
    else:
        parsed = layouts.read(dataset, csv, labels, duplicates, allow_ungrouped)
        df, n_pairs, grouped = parsed.rows, parsed.duplicates_listed, parsed.grouped
    added = None
    if add_ham10000 is not None:
        df, added = _add_ham10000(df, add_ham10000)
    codes = set(dataset.codes)
    bad_dx = invalid_dx(len(codes))
    group = dataset.columns.group or "lesion_id"
    missing_group = MISSING_LESION_ID if group == "lesion_id" else f"missing {group}"
    own = dataset.cleaning.missing_group == "own" or not grouped  # no group column: one group per image
    drop_unknown = dataset.cleaning.drop_unknown
    if "lesion_id" not in df.columns:
        df["lesion_id"] = ""
    seen: set[str] = set()
    keep, paths, groups, rejected = [], [], [], []
    n_own = 0
    for row in df.itertuples(index=False):
        r = row._asdict()
        image_id = r["image_id"]
        lesion = r["lesion_id"]
        path: str | None = None
        if not image_id:
            reason: str | None = MISSING_IMAGE_ID
        elif r[layouts.FAULT]:  # a parse fault, or a HAM10000 row already in ISIC 2019 (said so, not "duplicate")
            reason = r[layouts.FAULT]
        elif image_id in seen:
            reason = DUPLICATE
        elif r["dx"] not in codes:
            reason = bad_dx
        elif not lesion and not own:
            reason = missing_group
        elif image_id not in index:
            reason = MISSING_IMAGE
        elif (path := _pick(index[image_id])) is None:
            reason = CONFLICTING_COPIES
        else:
            reason = _age_fault(r["age"]) if "age" in r else None
            if reason == NULL_AGE and (keep_incomplete or not dataset.cleaning.drop_null_age):
                reason = None
            if reason is None and not keep_incomplete:
                reason = next((unknown(c) for c, v in r.items() if c in drop_unknown and v.lower() == "unknown"), None)
        seen.add(image_id)
        keep.append(reason is None)
        if reason is None:
            paths.append(path)
            n_own += not lesion
            groups.append(lesion or image_id)
        else:
            rejected.append(Rejection(image_id, reason))
    kept = df[keep].drop(columns=[layouts.FAULT]).reset_index(drop=True)
    kept["lesion_id"] = groups
    kept["path"] = paths
    return Metadata(
        kept, rejected, len(df), own_groups=n_own, ungrouped=not grouped, duplicates_listed=n_pairs, added=added
    )


def _add_ham10000(df: pd.DataFrame, csv: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """ISIC 2019's rows followed by HAM10000's, labelled as ISIC 2019 classes. All 10,015 HAM10000 images are in
    ISIC 2019 under the same image_id and lesion_id: a HAM10000 row whose image_id is already there is rejected
    (de-duplicated by image id), so an image is never counted twice or split across train and test."""
    ham = read_csv(csv)
    ham["dx"] = ham["dx"].str.lower().map(lambda dx: HAM10000_TO_ISIC2019.get(dx, dx))
    ham[layouts.FAULT] = ""
    already = ham["image_id"].isin(set(df["image_id"]))
    ham.loc[already, layouts.FAULT] = ALREADY_IN_ISIC2019
    combined = pd.concat([df, ham[[c for c in df.columns if c in ham.columns]]], ignore_index=True).fillna("")
    return combined, {"rows": len(ham), "already_in_isic2019": int(already.sum())}


def sample_metadata(row: Mapping[str, str]) -> dict[str, str | float | None]:
    """The metadata row as stored in a shard's `json`: known columns present, age as a number or null."""
    meta: dict[str, str | float | None] = {c: row[c] for c in COLUMNS if c in row}
    if "age" in meta:
        age = str(meta["age"])
        meta["age"] = None if age.lower() in _NULLS else float(age)
    return meta
