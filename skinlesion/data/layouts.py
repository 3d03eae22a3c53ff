"""The published CSV layouts, parsed into one canonical frame (see `data.datasets`).

- HAM10000: ``lesion_id,image_id,dx,dx_type,age,sex,localization,dataset``; one file.
- ISIC 2019: ground truth ``image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK`` (one-hot; some copies write ints, or
  CRLF line ends, so values are parsed as numbers) and metadata ``image,age_approx,anatom_site_general,
  lesion_id,sex``, joined on ``image``. 2,084 old archive images have no lesion_id; ids ending in
  ``_downsampled`` keep the suffix, which is part of the file name.
- ISIC 2020: ``image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,
  benign_malignant,target``; optionally ISIC_2020_Training_Duplicates.csv (``image_name_1,image_name_2``),
  whose second image of each pair is dropped.
- custom: any CSV, with the columns a YAML spec or ``--column`` names.

A parse never drops a row silently: a row it cannot label gets a `fault` (the reason rejected.csv records),
so rows in == rows kept + rows rejected still holds after the join.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from skinlesion.data.datasets import CANONICAL, Dataset
from skinlesion.errors import UserError

FAULT = "fault"  # the column of the parsed frame that holds a parse fault ("" for none)
NO_LABEL = "no row in the --labels file"
BAD_ONE_HOT = "one-hot label is not a single 1"
LISTED_DUPLICATE = "listed in the duplicates file"


def untrainable(label: str) -> str:
    return f"untrainable class {label.upper()} (it has no training images; the OOD notice covers it)"


@dataclass
class Parsed:
    rows: pd.DataFrame  # CANONICAL columns as text, plus FAULT
    duplicates_listed: int = 0  # pairs in the duplicates file
    grouped: bool = True  # False: no group column, split image by image (--allow-ungrouped)


def read_text_csv(path: Path, what: str, hint: str) -> pd.DataFrame:
    """A CSV as stripped text columns (empty string for blanks), or a UserError naming `what` and the file.

    pandas reads CRLF line ends and a UTF-8 byte-order mark as they come from Windows or Excel copies.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist; {hint}")
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file; {hint}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    except PermissionError as exc:
        raise UserError(f"cannot read {what} {path} ({exc.strerror}); check its permissions") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text ({exc.reason}); {hint}") from exc
    except pd.errors.EmptyDataError as exc:
        raise UserError(f"{what} {path} is empty; {hint}") from exc
    except (pd.errors.ParserError, OSError) as exc:
        raise UserError(f"cannot parse {what} {path}: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    return df.apply(lambda col: col.str.strip())


def _require(df: pd.DataFrame, names: list[str], what: str, path: Path, layout: str) -> None:
    missing = [c for c in names if c not in df.columns]
    if missing:
        raise UserError(
            f"{what} {path} lacks the column(s) {', '.join(missing)} (it has: {', '.join(df.columns)}); "
            f"the {layout} layout needs {', '.join(names)}"
        )


def check_group(have: Iterable[str], dataset: Dataset, path: Path, allow_ungrouped: bool) -> bool:
    """Whether the split can group by the dataset's group column: True when the CSV has it.

    Images of one lesion or patient on both sides of the split inflate every test number, so a group column
    that is named but absent, or not named at all, is an error; only `--allow-ungrouped` splits image by
    image (False), and the manifest records that. `cleaning.missing_group` is about empty *values* in a
    column that exists, never about a missing column. The flag is refused where the column is there, so
    that it never silently means nothing.
    """
    group, have = dataset.columns.group, list(have)
    if group is not None and group in have:
        if allow_ungrouped:
            raise UserError(
                f"--allow-ungrouped: metadata CSV {path} has the group column {group!r}, so the split keeps each "
                "group on one side; drop the flag"
            )
        return True
    if allow_ungrouped:
        return False
    ungrouped = "or pass --allow-ungrouped to split image by image (a patient or lesion may then be in train and test)"
    if group is None:
        raise UserError(
            f"metadata CSV {path}: the {dataset.name} description names no group column (a lesion or patient id, "
            f"so that no lesion or patient is on both sides of the split); add --column group=NAME (or "
            f"columns.group in the spec), {ungrouped}"
        )
    another = " (or name another with --column group=NAME)" if dataset.layout == "custom" else ""
    raise UserError(
        f"metadata CSV {path} has no group column {group!r} (it has: {', '.join(have)}), which the {dataset.name} "
        f"description groups the split by; add it{another}, {ungrouped}"
    )


def read(
    dataset: Dataset,
    metadata: Path,
    labels: Path | None = None,
    duplicates: Path | None = None,
    allow_ungrouped: bool = False,
) -> Parsed:
    """Parse the user's files into the canonical frame; file-level problems are one-line UserErrors."""
    cols = dataset.columns
    hint = f"pass the {dataset.name} metadata CSV with --metadata"
    meta = read_text_csv(metadata, "metadata CSV", hint)
    needed = [cols.image_id]
    if cols.label:
        needed.append(cols.label)
    if cols.one_hot and labels is None:
        needed += list(cols.one_hot)
    _require(meta, needed, "metadata CSV", metadata, dataset.name)
    grouped = check_group(meta.columns, dataset, metadata, allow_ungrouped)
    if labels is not None:
        if not cols.one_hot:
            raise UserError(f"--labels {labels}: the {dataset.name} layout keeps its labels in --metadata; drop it")
        truth = read_text_csv(labels, "ground-truth CSV", "pass the ground-truth CSV (image,MEL,NV,...) with --labels")
        _require(truth, [cols.image_id, *cols.one_hot], "ground-truth CSV", labels, dataset.name)
        truth = truth[[cols.image_id, *cols.one_hot]]
        meta = meta.drop(columns=[c for c in cols.one_hot if c in meta.columns])
        # Outer join: a metadata row without ground truth is rejected, ground truth without metadata is kept.
        meta = truth.merge(meta, on=cols.image_id, how="outer", indicator=True, sort=False)
        meta["_merge"] = meta["_merge"].astype(str)
        meta = meta.fillna("")
    out = pd.DataFrame(index=meta.index)
    out["image_id"] = meta[cols.image_id]
    out[FAULT] = ""
    if cols.one_hot:
        out["dx"], out[FAULT] = _from_one_hot(meta, cols.one_hot)
    else:
        out["dx"] = meta[cols.label].str.lower()
    if "_merge" in meta:
        out.loc[meta["_merge"] == "right_only", FAULT] = NO_LABEL
    raw = out["dx"]
    mapped = raw.map(lambda v: dataset.label_map.get(_number_text(v), v))
    out["dx"] = mapped
    for label in dataset.untrainable:
        out.loc[(raw == label) & (out[FAULT] == ""), FAULT] = untrainable(label)
    sources = {
        "lesion_id": cols.group,
        "age": cols.age,
        "sex": cols.sex,
        "localization": cols.site,
        "dx_type": cols.dx_type,
        "dataset": cols.source,
    }
    for canonical, column in sources.items():
        if column and column in meta.columns:
            out[canonical] = meta[column]
    n_pairs = 0
    if duplicates is not None:
        pairs = read_text_csv(duplicates, "duplicates CSV", "pass ISIC_2020_Training_Duplicates.csv")
        _require(pairs, ["image_name_1", "image_name_2"], "duplicates CSV", duplicates, "duplicates")
        n_pairs = len(pairs)
        copy_of = dict(zip(pairs["image_name_2"], pairs["image_name_1"], strict=True))
        listed = out["image_id"].isin(set(copy_of)) & (out[FAULT] == "")
        out.loc[listed, FAULT] = LISTED_DUPLICATE
    known = [c for c in CANONICAL if c in out.columns]
    return Parsed(rows=out[[*known, FAULT]].reset_index(drop=True), duplicates_listed=n_pairs, grouped=grouped)


def _number_text(value: str) -> str:
    """'1.0' and '1' look up the same label (a target column written by a float-minded exporter)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() else value


def _from_one_hot(meta: pd.DataFrame, columns: tuple[str, ...]) -> tuple[pd.Series, pd.Series]:
    """(label, fault) per row: the column holding the single 1 (lowercased), or a fault naming the values."""
    values = meta[list(columns)].apply(pd.to_numeric, errors="coerce")
    ones = values.eq(1.0)
    rest_zero = (values.eq(0.0) | ones).all(axis=1)
    single = ones.sum(axis=1).eq(1) & rest_zero
    label = pd.Series("", index=meta.index)
    label[single] = ones[single].idxmax(axis=1).str.lower()
    fault = pd.Series("", index=meta.index)
    fault[~single] = BAD_ONE_HOT
    return label, fault
