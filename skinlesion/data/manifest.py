"""A prepared dataset's contract: manifest.json, checked key by key and against its shards.

A manifest is data, not instructions. Its file names must be bare names of ``.tar`` files inside the
folder (no separator, no ``..``, no URL scheme or ``pipe:``), and readers only ever open them as local
files. `verify_split` scans a split's tar headers before an epoch is spent on it, so a truncated shard,
a class index out of range, classes that disagree with the shards' class codes or a manifest that
overstates its shards is one error naming the shard and key.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Any

from skinlesion.control_chars import control_character
from skinlesion.data.datasets import of_manifest
from skinlesion.errors import UserError


def read_manifest(shards: Path) -> dict[str, Any]:
    """The manifest of a prepared dataset, checked key by key; a one-line error for anything amiss.

    A manifest is data, not instructions: its file names must be bare names of ``.tar`` files inside
    the folder (no separator, no ``..``, no URL scheme or ``pipe:``), and are only ever opened as local files.
    """
    shards = Path(shards)
    if not shards.is_dir():
        raise UserError(
            f"data.shards={shards} does not exist; create it with `skinlesion prepare --out {shards} ...` "
            f"or point data.shards at a prepared folder"
        )
    path = shards / "manifest.json"
    if not path.is_file():
        raise UserError(
            f"{path} is missing: {shards} is not a complete dataset (prepare writes manifest.json last); "
            f"rerun `skinlesion prepare --out {shards} --overwrite ...`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc}); rerun `skinlesion prepare`") from exc
    _check_manifest(manifest, path)
    return manifest


_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.tar$")


def _check_manifest(manifest: Any, path: Path) -> None:
    def bad(key: str, what: str) -> UserError:
        return UserError(f"{path}: {key} {what}; the manifest is damaged or not from skinlesion prepare (rerun it)")

    if not isinstance(manifest, dict):
        raise bad("the top level", "is not an object")
    classes = manifest.get("classes")
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise bad("'classes'", f"is {classes!r}, not a list of two or more distinct class codes")
    for index, code in enumerate(classes):
        if (char := control_character(code)) is not None:  # printed on terminals and plots: see control_chars
            raise bad(f"'classes'[{index}]", f"is {code!r}, with a control character ({char!r})")
    of_manifest(manifest, str(path))  # the dataset description, when there is one, agrees with 'classes'
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not set(splits) <= {"train", "val", "test"}:
        raise bad("'splits'", "must be an object with train, val and/or test")
    for split, info in splits.items():
        key = f"splits.{split}"
        if not isinstance(info, dict):
            raise bad(key, "is not an object")
        samples, files, sizes = info.get("samples"), info.get("files"), info.get("shard_samples")
        if not _count(samples):
            raise bad(f"{key}.samples", f"is {samples!r}, not a count")
        if not isinstance(files, list) or not all(isinstance(f, str) and _SHARD_NAME.match(f) for f in files):
            odd = (
                next((f for f in files if not (isinstance(f, str) and _SHARD_NAME.match(f))), files)
                if isinstance(files, list)
                else files
            )
            raise bad(f"{key}.files", f"holds {odd!r}: entries must be bare .tar file names inside {path.parent}")
        if not isinstance(sizes, list) or len(sizes) != len(files) or not all(map(_count, sizes)):
            raise bad(f"{key}.shard_samples", "must list one sample count per file")
        if sum(sizes) != samples:
            raise bad(f"{key}.shard_samples", f"adds up to {sum(sizes)}, but samples is {samples}")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


UNGROUPED = (
    "Images were split without grouping (prepare --allow-ungrouped: the metadata had no lesion or patient "
    "column): a patient or lesion may appear in train and test, so these numbers may be optimistic."
)


def ungrouped_note(manifest: dict[str, Any]) -> list[str]:
    """[UNGROUPED] when prepare split image by image (`groups.ungrouped`), else []: evaluate's summary and
    the model card's limitations say so, since a lesion seen in training inflates every test number."""
    groups = manifest.get("groups")
    return [UNGROUPED] if isinstance(groups, dict) and groups.get("ungrouped") is True else []


def split_shards(shards: Path, manifest: dict[str, Any], split: str) -> list[tuple[Path, int]]:
    """(shard path, samples in it) for each file of `split`, in manifest order."""
    info = manifest["splits"].get(split)
    if info is None:
        raise UserError(f"{shards}/manifest.json has no {split!r} split")
    files = [Path(shards) / name for name in info["files"]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"shard files listed in {shards}/manifest.json are missing: {missing[:3]}; rerun prepare")
    return list(zip(files, info["shard_samples"], strict=True))


def verify_split(shards: Path, manifest: dict[str, Any], split: str) -> None:
    """Check every shard of `split` against the manifest before an epoch is spent on it.

    A header scan: each file must be a readable tar whose samples each have a ``jpg``, a ``cls`` in range
    and a ``json`` whose ``dx`` (the class code prepare wrote beside the index) is ``classes[cls]``, as many
    samples as the manifest says. Errors name the shard and the key.

    The ``dx`` check binds the manifest's class order to the shards. The index alone cannot: swap mel and nv
    in `classes` (and in the description) and every index is still in range, so a model would train with
    the two swapped and its best.pt would name them wrongly. Every prepare since the first has written each
    sample's class code into its json, so no digest or format change is needed: the shards already say
    which class each index means, and a manifest edited by hand disagrees with them on the first sample of
    a moved class.
    """
    where = Path(shards) / "manifest.json"
    classes = manifest["classes"]
    for path, expected in split_shards(shards, manifest, split):
        keys: dict[str, set[str]] = {}
        labels: dict[str, int] = {}
        codes: dict[str, Any] = {}
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if not member.isreg() or "/" in member.name:
                        continue
                    keys.setdefault(key, set()).add(ext)
                    if ext == "cls":
                        labels[key] = label_of(tar.extractfile(member).read(), key, path, len(classes))
                    elif ext == "json":
                        codes[key] = _class_code(tar.extractfile(member).read())
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"shard {path} is not a readable tar file ({exc}); rerun `skinlesion prepare`") from exc
        for key, exts in keys.items():
            if not {"jpg", "cls"} <= exts:
                raise UserError(f"shard {path}: sample {key!r} lacks {sorted({'jpg', 'cls'} - exts)}")
            code = codes.get(key)
            if not isinstance(code, str):
                raise UserError(
                    f"shard {path}: sample {key!r} has no class code (a json with 'dx'), so the classes of {where} "
                    "cannot be checked against it; the shards are not from `skinlesion prepare`: re-run it"
                )
            if code != classes[labels[key]]:
                raise UserError(
                    f"{where}: classes[{labels[key]}] is {classes[labels[key]]!r}, but sample {key!r} of {path.name} "
                    f"with that class index is a {code!r}: the manifest's classes do not match its shards (edited "
                    "by hand?); re-run `skinlesion prepare`"
                )
        if len(keys) != expected:
            raise UserError(
                f"shard {path} holds {len(keys)} samples but {shards}/manifest.json says {expected}; "
                f"the shards changed after prepare: rerun `skinlesion prepare --overwrite`"
            )


def _class_code(data: bytes) -> Any:
    """The ``dx`` of a sample's ``json`` member (data, parsed, never executed); None when it has none."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return meta.get("dx") if isinstance(meta, dict) else None


def label_of(data: bytes, key: str, shard: Any, n_classes: int | None = None) -> int:
    """A ``cls`` member as a class index, or an error naming the sample.

    Without `n_classes` (the loaders' per-sample decode) only the form is checked: `verify_split` has
    checked every index against the manifest's classes before an epoch or an evaluation starts.
    """
    try:
        label = int(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        label = -1
    if label < 0 or (n_classes is not None and label >= n_classes):
        top = "" if n_classes is None else f"-{n_classes - 1}"
        raise UserError(f"shard {shard}: sample {key!r} has class {data[:20]!r}, not an index 0{top}")
    return label
