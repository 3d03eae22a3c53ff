"""What a dataset is, as data: its columns, classes, label map, cleaning rules and split grouping.

HAM10000 used to be a set of constants every stage imported. A `Dataset` description replaces them:
`prepare --dataset ham10000|isic2019|isic2020|custom` picks a preset (or reads a small YAML spec), writes
the description into manifest.json, and every later stage reads the classes (in index order), their
names and which are malignant from there or from the checkpoint, never from a global. HAM10000 stays
the default, and its description reproduces the old constants exactly.

Rows of every layout are parsed (`data.layouts`) into one canonical frame: image_id, dx (a class code),
lesion_id (the *grouping key*: a lesion for HAM10000 and ISIC 2019, a patient for ISIC 2020), age, sex,
localization (the anatomical site), dx_type, dataset. So the split, the shards' json and the bootstrap
work unchanged whatever the source; `columns.group` records what the grouping key really was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skinlesion.control_chars import control_character
from skinlesion.errors import UserError

PRESETS = ("ham10000", "isic2019", "isic2020")
DATASETS = (*PRESETS, "custom")
MELANOMA = "mel"  # the code every preset gives melanoma; metrics report it when a dataset has it
CANONICAL = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset")
STRATIFY = ("majority", "rarest")
MISSING_GROUP = ("reject", "own")


@dataclass(frozen=True)
class ClassInfo:
    code: str  # short code, as in shards and metrics ("mel")
    name: str  # full name shown to a dermatologist
    malignant: bool = False
    note: str = ""  # e.g. how the class maps onto another dataset's


@dataclass(frozen=True)
class Columns:
    """Column names in the user's CSV(s); None where the layout has no such column."""

    image_id: str
    label: str | None = None  # one column holding the label ...
    one_hot: tuple[str, ...] = ()  # ... or one 0/1 column per label (ISIC 2019's ground truth)
    group: str | None = None  # lesion or patient id: the split keeps a group on one side
    age: str | None = None
    sex: str | None = None
    site: str | None = None
    dx_type: str | None = None
    source: str | None = None  # HAM10000's `dataset` column


@dataclass(frozen=True)
class Cleaning:
    """Which rows are dropped beyond the faults every dataset rejects (no image, unknown label ...).

    `prepare --keep-incomplete` overrides both drop rules.
    """

    drop_null_age: bool = False
    drop_unknown: tuple[str, ...] = ()  # canonical columns where the value 'unknown' drops the row
    # reject | own: a row with an empty group id becomes its own group (counted in the manifest). The column
    # itself must exist: a missing one is an error unless prepare --allow-ungrouped (layouts.check_group).
    missing_group: str = "reject"


@dataclass(frozen=True)
class Dataset:
    """A dataset description: everything the harness must know about a dataset's files and labels."""

    name: str
    classes: tuple[ClassInfo, ...]
    columns: Columns
    label_map: dict[str, str] = field(default_factory=dict)  # CSV value (case-insensitive) -> class code
    untrainable: tuple[str, ...] = ()  # labels of the layout without training images (ISIC 2019's UNK)
    cleaning: Cleaning = Cleaning()
    stratify: str = "majority"  # a group's stratum: its most frequent class, or its rarest (any melanoma)
    # The ISIC submission CSV after `image`: (column, class code), or (column, None) for a column the
    # model has no class for (ISIC 2019's UNK, written as 0).
    submission: tuple[tuple[str, str | None], ...] = ()
    layout: str = "ham10000"  # which parser reads the files (data.layouts)

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(c.code for c in self.classes)

    @property
    def names(self) -> dict[str, str]:
        return {c.code: c.name for c in self.classes}

    @property
    def malignant(self) -> tuple[str, ...]:
        return tuple(c.code for c in self.classes if c.malignant)

    @property
    def group_column(self) -> str:
        """The CSV column the split groups by; "image_id" when there is none (each image its own group)."""
        return self.columns.group or "image_id"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as manifest.json's `dataset` holds it."""
        return _lists(dataclasses.asdict(self))


def _lists(value: Any) -> Any:
    """Tuples as lists, recursively: the description as json.load gives it back."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(v) for v in value]
    return value


def _ham10000() -> Dataset:
    split_note = "ISIC 2019 splits it into AK and SCC (actinic keratosis, squamous cell carcinoma)"
    classes = (
        ClassInfo(
            "akiec",
            "actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
            True,
            f"ISIC 2019 AK; {split_note}",
        ),
        ClassInfo("bcc", "basal cell carcinoma", True, "ISIC 2019 BCC"),
        ClassInfo("bkl", "benign keratosis-like lesion", False, "ISIC 2019 BKL"),
        ClassInfo("df", "dermatofibroma", False, "ISIC 2019 DF"),
        ClassInfo("mel", "melanoma", True, "ISIC 2019 MEL"),
        ClassInfo("nv", "melanocytic nevus", False, "ISIC 2019 NV"),
        ClassInfo("vasc", "vascular lesion", False, "ISIC 2019 VASC"),
    )
    order = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")  # ISIC 2018 Task 3: image,MEL,NV,BCC,AKIEC,...
    return Dataset(
        name="ham10000",
        classes=classes,
        columns=Columns(
            image_id="image_id",
            label="dx",
            group="lesion_id",
            age="age",
            sex="sex",
            site="localization",
            dx_type="dx_type",
            source="dataset",
        ),
        label_map={c.code: c.code for c in classes},
        cleaning=Cleaning(drop_null_age=True, drop_unknown=CANONICAL, missing_group="reject"),
        submission=tuple((dx.upper(), dx) for dx in order),
        layout="ham10000",
    )


def _isic2019() -> Dataset:
    classes = (
        ClassInfo("ak", "actinic keratosis", True, "HAM10000 akiec holds AK and SCC (Bowen's disease)"),
        ClassInfo("bcc", "basal cell carcinoma", True),
        ClassInfo("bkl", "benign keratosis-like lesion"),
        ClassInfo("df", "dermatofibroma"),
        ClassInfo("mel", "melanoma", True),
        ClassInfo("nv", "melanocytic nevus"),
        ClassInfo("scc", "squamous cell carcinoma", True, "HAM10000 files SCC under akiec"),
        ClassInfo("vasc", "vascular lesion"),
    )
    official = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    return Dataset(
        name="isic2019",
        classes=classes,
        columns=Columns(
            image_id="image",
            one_hot=(*official, "UNK"),
            group="lesion_id",
            age="age_approx",
            sex="sex",
            site="anatom_site_general",
        ),
        label_map={col.lower(): col.lower() for col in official},
        untrainable=("unk",),
        cleaning=Cleaning(missing_group="own"),  # 2,084 old archive images have no lesion_id
        submission=(*((col, col.lower()) for col in official), ("UNK", None)),
        layout="isic2019",
    )


def _isic2020() -> Dataset:
    classes = (
        ClassInfo("other", "not melanoma (benign lesion)"),
        ClassInfo("mel", "melanoma", True),
    )
    return Dataset(
        name="isic2020",
        classes=classes,
        columns=Columns(
            image_id="image_name",
            label="target",
            group="patient_id",
            age="age_approx",
            sex="sex",
            site="anatom_site_general_challenge",
            # No dx_type: `diagnosis` is the label itself (melanoma, nevus, unknown ...), not how it was
            # confirmed; as dx_type it made "confirmed by melanoma" the positive class's subgroup.
        ),
        label_map={"0": "other", "1": "mel"},
        cleaning=Cleaning(missing_group="reject"),
        stratify="rarest",  # a patient with any melanoma is a melanoma patient: 584 spread over the splits
        submission=(("target", "mel"),),
        layout="isic2020",
    )


def preset(name: str) -> Dataset:
    """The description of a published dataset (`prepare --dataset NAME`)."""
    makers = {"ham10000": _ham10000, "isic2019": _isic2019, "isic2020": _isic2020}
    if name not in makers:
        raise UserError(f"--dataset {name!r} is not one of {', '.join(DATASETS)} (custom needs --spec or --column)")
    return makers[name]()


HAM10000 = _ham10000()
# HAM10000's labels as ISIC 2019 classes, for `prepare --dataset isic2019 --add-ham10000`. Lossy for akiec:
# ISIC 2019 splits it into AK and SCC, and HAM10000 does not say which (its Bowen's disease is an SCC in situ).
HAM10000_TO_ISIC2019 = {"akiec": "ak", "bcc": "bcc", "bkl": "bkl", "df": "df", "mel": "mel", "nv": "nv", "vasc": "vasc"}


def from_dict(raw: Any, where: str) -> Dataset:
    """A description read back from manifest.json or a YAML spec, checked key by key (errors name `where`)."""

    def bad(key: str, what: str) -> UserError:
        return UserError(f"{where}: {key} {what}")

    if not isinstance(raw, dict):
        raise bad("the dataset description", "is not a mapping")
    name = raw.get("name", "custom")
    if not isinstance(name, str) or not name:
        raise bad("name", f"is {name!r}, not a non-empty string")
    classes = _classes(raw.get("classes"), bad)
    codes = {c.code for c in classes}
    cols = raw.get("columns")
    if not isinstance(cols, dict):
        raise bad("columns", "must be a mapping of image_id, label or one_hot, group, age, sex, site")
    known = {f.name for f in dataclasses.fields(Columns)}
    unknown_keys = sorted(set(cols) - known)
    if unknown_keys:
        raise bad("columns", f"has unknown key(s) {', '.join(unknown_keys)} (known: {', '.join(sorted(known))})")
    for key, value in cols.items():
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) and v for v in value)
        if not (value is None or (isinstance(value, str) and value) or (key == "one_hot" and ok)):
            raise bad(f"columns.{key}", f"is {value!r}, not a column name")
    columns = Columns(**{**cols, "one_hot": tuple(cols.get("one_hot") or ())})
    if not columns.image_id:
        raise bad("columns.image_id", "is missing: name the column that holds the image file name")
    if bool(columns.label) == bool(columns.one_hot):
        raise bad("columns", "must name exactly one of label (one column) and one_hot (one column per label)")
    label_map = raw.get("label_map") or {c.code: c.code for c in classes}
    if not isinstance(label_map, dict) or not all(isinstance(k, str | int) for k in label_map):
        raise bad("label_map", "must map label values to class codes")
    label_map = {str(k).strip().lower(): str(v) for k, v in label_map.items()}
    stray = sorted({v for v in label_map.values()} - codes)
    if stray:
        raise bad("label_map", f"maps to {', '.join(stray)}, which are not among the classes {sorted(codes)}")
    cleaning = raw.get("cleaning") or {}
    if not isinstance(cleaning, dict) or not set(cleaning) <= {"drop_null_age", "drop_unknown", "missing_group"}:
        raise bad("cleaning", "may only hold drop_null_age, drop_unknown and missing_group")
    clean = Cleaning(
        drop_null_age=bool(cleaning.get("drop_null_age", False)),
        drop_unknown=tuple(cleaning.get("drop_unknown") or ()),
        missing_group=cleaning.get("missing_group", "reject"),
    )
    if clean.missing_group not in MISSING_GROUP:
        raise bad("cleaning.missing_group", f"is {clean.missing_group!r}, not one of {', '.join(MISSING_GROUP)}")
    if not set(clean.drop_unknown) <= set(CANONICAL):
        raise bad("cleaning.drop_unknown", f"names columns outside {', '.join(CANONICAL)}")
    stratify = raw.get("stratify", "majority")
    if stratify not in STRATIFY:
        raise bad("stratify", f"is {stratify!r}, not one of {', '.join(STRATIFY)}")
    submission = raw.get("submission") or [(c.code.upper(), c.code) for c in classes]
    try:
        submission = tuple((str(col), None if code is None else str(code)) for col, code in submission)
    except (TypeError, ValueError) as exc:
        raise bad("submission", "must list [column, class code or null] pairs") from exc
    if any(code is not None and code not in codes for _, code in submission):
        raise bad("submission", f"names a class outside {sorted(codes)}")
    layout = raw.get("layout", "custom")
    if layout not in DATASETS:
        raise bad("layout", f"is {layout!r}, not one of {', '.join(DATASETS)}")
    untrainable = raw.get("untrainable") or ()
    return Dataset(
        name=name,
        classes=classes,
        columns=columns,
        label_map=label_map,
        untrainable=tuple(str(u).lower() for u in untrainable),
        cleaning=clean,
        stratify=stratify,
        submission=submission,
        layout=layout,
    )


def _classes(raw: Any, bad: Any) -> tuple[ClassInfo, ...]:
    if not isinstance(raw, list) or len(raw) < 2:
        raise bad("classes", "must list at least two classes, each {code, name, malignant}")
    out = []
    for i, entry in enumerate(raw):
        if isinstance(entry, str):
            entry = {"code": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("code"), str) or not entry["code"].strip():
            raise bad(f"classes[{i}]", f"is {entry!r}; give each class a code (and a name, malignant: true|false)")
        extra = sorted(set(entry) - {"code", "name", "malignant", "note"})
        if extra:
            raise bad(f"classes[{i}]", f"has unknown key(s) {', '.join(extra)}")
        code = entry["code"].strip()
        malignant = entry.get("malignant", False)
        if not isinstance(malignant, bool):
            raise bad(f"classes[{i}].malignant", f"is {malignant!r}, not true or false")
        name = str(entry.get("name") or code)
        for key, text in (("code", code), ("name", name)):
            if (char := control_character(text)) is not None:  # shown on terminals and plots: see control_chars
                raise bad(f"classes[{i}].{key}", f"is {text!r}, with a control character ({char!r}); remove it")
        out.append(ClassInfo(code, name, malignant, str(entry.get("note") or "")))
    codes = [c.code for c in out]
    dup = next((c for c in codes if codes.count(c) > 1), None)
    if dup is not None:
        raise bad("classes", f"list {dup!r} twice")
    return tuple(out)


def load_spec(path: Path) -> Dataset:
    """A custom description from a small YAML file (`prepare --dataset custom --spec FILE`); see docs/data.md."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--spec {path} does not exist; write a YAML description (see docs/data.md, 'custom')")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"--spec {path} is not readable YAML ({str(exc).splitlines()[0]})") from exc
    if isinstance(raw, dict):
        raw = {"layout": "custom", **raw}
    return from_dict(raw, f"--spec {path}")


def custom(spec: Path | None, columns: dict[str, str], labels: list[str] | None, malignant: tuple[str, ...]) -> Dataset:
    """`--dataset custom`: a YAML spec, its columns overridden by `--column KEY=NAME`; without a spec, the
    classes are the label values found in the CSV (sorted) and `--malignant` names the malignant ones."""
    if spec is not None:
        base = load_spec(spec)
        return dataclasses.replace(base, columns=dataclasses.replace(base.columns, **columns)) if columns else base
    if labels is None:
        raise UserError("--dataset custom needs --spec FILE, or --column image_id=... --column label=...")
    unknown_mal = sorted(set(malignant) - set(labels))
    if unknown_mal:
        raise UserError(f"--malignant {','.join(unknown_mal)}: not among the labels found ({', '.join(labels)})")
    raw = {
        "name": "custom",
        "layout": "custom",
        "classes": [{"code": v, "malignant": v in malignant} for v in labels],
        "columns": columns,
        "label_map": {v: v for v in labels},
    }
    return from_dict(raw, "--column")


def of_manifest(manifest: dict[str, Any], where: str = "manifest.json") -> Dataset:
    """The description a prepared dataset carries, checked against the manifest's `classes`.

    A manifest from before descriptions has no `dataset`: it is HAM10000's only when its classes are
    HAM10000's, in HAM10000's order; anything else (ISIC 2020's two classes, a hand-reordered list) would
    size the head, name the classes and pick the malignant ones from a guess, so it is refused. Whether the
    classes also fit the shards' labels is `manifest.verify_split`'s check.
    """
    raw = manifest.get("dataset")
    if raw is None:
        if list(manifest.get("classes") or []) == list(HAM10000.codes):
            return HAM10000
        raise UserError(
            f"{where} has no 'dataset' description, and its classes {manifest.get('classes')} are not HAM10000's "
            f"{list(HAM10000.codes)}: it is from an older skinlesion or was edited by hand; re-run `skinlesion "
            "prepare` to write a complete manifest"
        )
    dataset = from_dict(raw, f"{where}: dataset")
    if list(dataset.codes) != list(manifest.get("classes") or []):
        raise UserError(f"{where}: dataset.classes {list(dataset.codes)} differ from classes {manifest.get('classes')}")
    return dataset


def known_malignant(classes: tuple[str, ...]) -> tuple[str, ...] | None:
    """The malignant classes of the preset with exactly these classes (for checkpoints that predate the field)."""
    for name in PRESETS:
        d = preset(name)
        if d.codes == tuple(classes):
            return d.malignant
    return None


def names_for(classes: tuple[str, ...]) -> dict[str, str]:
    """Full names of the preset with exactly these classes; empty when none has them (a custom dataset)."""
    for name in PRESETS:
        d = preset(name)
        if d.codes == tuple(classes):
            return d.names
    return {}
