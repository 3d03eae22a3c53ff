"""`skinlesion prepare`: metadata + image folders -> clean, lesion-grouped, train-balanced shards.

    read + validate + clean (metadata.py) -> decode every kept image once, in worker processes
    (images.py) -> split by lesion (split.py) -> balance train -> write shards in worker processes,
    then rejected.csv and manifest.json (shards.py)

Images are decoded before the split so that a file that turns out to be corrupt is never
resampled into train. Workers return JPEG bytes that the main process appends to a spool file in
the build folder, so memory stays flat whatever the dataset and image size; shard writers read the
bytes back from the spool, so a resampled image is never decoded twice.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from tqdm import tqdm

from skinlesion import __version__
from skinlesion.control_chars import control_character
from skinlesion.data import datasets, images, layouts, metadata, shards, source
from skinlesion.data.pool import worker_pool
from skinlesion.data.split import SPLITS, balance, split_by_lesion
from skinlesion.errors import UserError
from skinlesion.files import no_room_is_user_error

MAX_STORED_SIZE = images.MAX_STORED_SIZE
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class PrepareOptions:
    """The arguments of `skinlesion prepare` (see `skinlesion prepare --help`)."""

    metadata: Path
    images: tuple[Path, ...]
    out: Path = Path("shards")
    samples_per_class: int | None = None
    image_size: int = 256
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    keep_incomplete: bool = False
    on_bad_image: str = "skip"
    overwrite: bool = False
    samples_per_shard: int | None = None
    min_shards: int = 32
    workers: int | None = None
    dataset: str = "ham10000"  # ham10000 | isic2019 | isic2020 | custom (data.datasets)
    labels: Path | None = None  # ISIC 2019's ground-truth CSV (one-hot)
    duplicates: Path | None = None  # ISIC 2020's duplicates list
    spec: Path | None = None  # custom: the YAML description
    columns: tuple[tuple[str, str], ...] = ()  # custom: --column KEY=NAME
    malignant: tuple[str, ...] = ()  # custom without a spec: the malignant labels
    add_ham10000: Path | None = None  # isic2019: HAM10000_metadata.csv to combine, de-duplicated by image id
    allow_ungrouped: bool = False  # no group column: split image by image (recorded in the manifest)


def describe(opts: PrepareOptions) -> datasets.Dataset:
    """The dataset description that `opts` selects; for `custom` without a spec, its classes are the labels
    found in the CSV."""
    if opts.dataset != "custom":
        for flag, value in (("--spec", opts.spec), ("--column", opts.columns), ("--malignant", opts.malignant)):
            if value:
                raise UserError(f"{flag} is for --dataset custom; --dataset {opts.dataset} has a fixed layout")
        return datasets.preset(opts.dataset)
    columns = dict(opts.columns)
    found = None
    if opts.spec is None:
        label = columns.get("label")
        if not label or not columns.get("image_id"):
            raise UserError("--dataset custom needs --spec FILE, or --column image_id=NAME --column label=NAME")
        table = layouts.read_text_csv(opts.metadata, "metadata CSV", "pass the labels CSV with --metadata")
        if label not in table.columns:
            raise UserError(f"metadata CSV {opts.metadata} has no column {label!r} (--column label={label})")
        found = sorted({v for v in table[label].str.lower() if v})
        bad = next((v for v in found if control_character(v) is not None), None)
        if bad is not None:  # the labels become class codes, printed on terminals: see control_chars
            raise UserError(
                f"metadata CSV {opts.metadata}: column {label!r} holds the label {bad!r}, with a control "
                "character; fix that row (labels are class codes, shown as plain text)"
            )
    return datasets.custom(opts.spec, columns, found, tuple(m.lower() for m in opts.malignant))


@dataclass(frozen=True)
class PrepareResult:
    out: Path
    manifest: dict


def _check(opts: PrepareOptions) -> None:
    problems = []
    if not (opts.image_size == 0 or 16 <= opts.image_size <= MAX_STORED_SIZE):
        problems.append(f"--image-size {opts.image_size} must be 16 to {MAX_STORED_SIZE} (or 0: the original bytes)")
    if not (0 <= opts.val_fraction < 1 and 0 <= opts.test_fraction < 1 and opts.val_fraction + opts.test_fraction < 1):
        problems.append(
            f"--val-fraction {opts.val_fraction} and --test-fraction {opts.test_fraction} must be >= 0 "
            "and add up to less than 1"
        )
    if opts.samples_per_class is not None and opts.samples_per_class < 1:
        problems.append(f"--samples-per-class {opts.samples_per_class} must be >= 1")
    if opts.samples_per_shard is not None and opts.samples_per_shard < 1:
        problems.append(f"--samples-per-shard {opts.samples_per_shard} must be >= 1")
    if opts.min_shards < 1:
        problems.append(f"--min-shards {opts.min_shards} must be >= 1")
    if opts.workers is not None and opts.workers < 1:
        problems.append(f"--workers {opts.workers} must be >= 1")
    if opts.on_bad_image not in ("skip", "error"):
        problems.append(f"--on-bad-image {opts.on_bad_image!r} must be skip or error")
    if not opts.images:
        problems.append("pass at least one --images folder")
    if opts.dataset not in datasets.DATASETS:
        problems.append(f"--dataset {opts.dataset!r} must be one of {', '.join(datasets.DATASETS)}")
    if opts.labels is not None and opts.dataset not in ("isic2019", "custom"):
        problems.append(f"--labels is ISIC 2019's ground truth; --dataset {opts.dataset} keeps labels in --metadata")
    if opts.duplicates is not None and opts.dataset != "isic2020":
        problems.append("--duplicates is ISIC 2020's duplicates list; pass it with --dataset isic2020")
    if opts.add_ham10000 is not None and opts.dataset != "isic2019":
        problems.append("--add-ham10000 combines HAM10000 with ISIC 2019: pass it with --dataset isic2019")
    if opts.dataset == "isic2019" and opts.labels is None:
        problems.append("--dataset isic2019 needs --labels ISIC_2019_Training_GroundTruth.csv")
    if problems:
        raise UserError("; ".join(problems))


def _encode(task: tuple[int, str, int]) -> tuple[int, bytes | None, str | None]:
    """Worker: (row, path, size) -> (row, JPEG bytes or None, rejection reason or None)."""
    i, path, size = task
    try:
        return i, images.process(path, size), None
    except images.BadImage as exc:
        return i, None, exc.reason


def _write_shard(task: tuple[Path, Path, list[shards.Entry]]) -> int:
    return shards.write_shard(*task)


class _Inline:
    """A stand-in for Pool with one worker: no process start-up for tiny jobs, and easy debugging."""

    def imap_unordered(self, fn: Callable[[T], R], tasks: Iterable[T], chunksize: int = 1) -> Iterator[R]:
        return map(fn, tasks)

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _encode_all(
    pool: Pool | _Inline, workers: int, kept: pd.DataFrame, opts: PrepareOptions, spool: Path
) -> tuple[dict[int, tuple[int, int]], dict[int, str]]:
    """Decode every kept row's image once; returns spool (offset, length) per good row, reason per bad row."""
    tasks = [(i, path, opts.image_size) for i, path in enumerate(kept["path"])]
    where: dict[int, tuple[int, int]] = {}
    bad: dict[int, str] = {}
    chunk = max(1, min(32, len(tasks) // (workers * 8)))
    with spool.open("wb") as f, tqdm(total=len(tasks), desc="images", unit="img", file=sys.stderr) as bar:
        for i, data, reason in pool.imap_unordered(_encode, tasks, chunksize=chunk):
            bar.update()
            if data is None:
                if opts.on_bad_image == "error":
                    raise UserError(
                        f"image {kept['path'].iloc[i]} (image_id {kept['image_id'].iloc[i]}): {reason}; "
                        "stopped by --on-bad-image error (nothing written). Fix or remove the file, or pass "
                        "--on-bad-image skip to record it in rejected.csv and go on"
                    )
                bad[i] = str(reason)
                continue
            where[i] = (f.tell(), len(data))
            f.write(data)
    return where, bad


def _split_rows(
    good: pd.DataFrame, opts: PrepareOptions, dataset: datasets.Dataset
) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Rows per split in the order they go into shards (shuffled: each shard a random mix of classes), and
    the train split's class counts before balancing (the class priors a logit-adjusted loss needs)."""
    assignment = split_by_lesion(good, opts.val_fraction, opts.test_fraction, opts.seed, dataset.stratify)
    rng = np.random.default_rng([opts.seed, 1])
    out = {}
    natural = good[assignment == "train"]["dx"].value_counts()
    for split in SPLITS:
        rows = good[assignment == split].reset_index(drop=True)
        if split == "train" and opts.samples_per_class is not None:
            rows = balance(rows, opts.samples_per_class, seed=opts.seed)
        else:
            rows = rows.iloc[rng.permutation(len(rows))].reset_index(drop=True).assign(copy=0)
        out[split] = rows
    return out, {dx: int(natural.get(dx, 0)) for dx in dataset.codes}


def _keys(rows: pd.DataFrame) -> list[str]:
    """`__key__` per row: the image_id (dots would split a WebDataset key), `_r<n>` for the n-th repeat."""
    base = rows["image_id"].str.replace(".", "_", regex=False)
    keys = [k if c == 0 else f"{k}_r{c}" for k, c in zip(base, rows["copy"], strict=True)]
    if len(set(keys)) != len(keys):
        dup = next(k for k, n in Counter(keys).items() if n > 1)
        raise UserError(f"two samples would share the key {dup!r}; rename the image_id(s) behind it")
    return keys


def _entries(rows: pd.DataFrame, where: dict[int, tuple[int, int]], classes: tuple[str, ...]) -> list[shards.Entry]:
    records = rows.to_dict("records")
    index = {dx: i for i, dx in enumerate(classes)}
    return [
        shards.Entry(key, *where[r["row"]], index[r["dx"]], metadata.sample_metadata(r))
        for key, r in zip(_keys(rows), records, strict=True)
    ]


def _split_manifest(rows: pd.DataFrame, files: list[str], sizes: list[int], classes: tuple[str, ...]) -> dict:
    counts = rows["dx"].value_counts()
    return {
        "samples": len(rows),
        "shards": len(files),
        "files": files,
        "shard_samples": sizes,
        "class_counts": {dx: int(counts.get(dx, 0)) for dx in classes},
        "images": int(rows["image_id"].nunique()),
        "lesions": int(rows["lesion_id"].nunique()),
    }


def prepare(opts: PrepareOptions) -> PrepareResult:
    """Run the whole preparation; print a summary table; return OUT and its manifest.

    A full disk (or quota) anywhere in the build is one line naming OUT: the partial build is gone by then,
    and a previous dataset in OUT is untouched (it is only replaced by `Build.commit`, which renames).
    """
    then = "the partial build was removed, a dataset already there is untouched; free space or choose another --out"
    with no_room_is_user_error(Path(opts.out), "--out", then):
        return _prepare(opts)


def _prepare(opts: PrepareOptions) -> PrepareResult:
    _check(opts)
    started = time.perf_counter()
    out = Path(opts.out)
    shards.check_destination(out, opts.overwrite)
    dataset = describe(opts)
    meta = metadata.load(
        opts.metadata,
        opts.images,
        opts.keep_incomplete,
        dataset,
        opts.labels,
        opts.duplicates,
        opts.add_ham10000,
        opts.allow_ungrouped,
    )
    if meta.ungrouped:  # the description written says what the split used: no group column
        dataset = dataclasses.replace(dataset, columns=dataclasses.replace(dataset.columns, group=None))
    if meta.kept.empty:
        reasons = dict(Counter(r.reason for r in meta.rejected).most_common())
        raise UserError(f"no usable rows in {opts.metadata} (rejected: {reasons}); check --images and the CSV")
    timings = {"metadata": time.perf_counter() - started}
    workers = min(opts.workers or os.cpu_count() or 1, len(meta.kept))
    if workers > 1:
        import webdataset  # noqa: F401  (once here, so forked workers inherit it instead of each importing torch)

        timings["import webdataset"] = time.perf_counter() - started - timings["metadata"]
    with shards.Build(out, opts.overwrite) as build, worker_pool(workers) if workers > 1 else _Inline() as pool:
        spool = build.path / ".spool"
        where, bad = _encode_all(pool, workers, meta.kept, opts, spool)
        timings["images"] = time.perf_counter() - started - sum(timings.values())
        rejected = [(r.image_id, r.reason) for r in meta.rejected]
        rejected += [(meta.kept["image_id"].iloc[i], reason) for i, reason in sorted(bad.items())]
        good = meta.kept.assign(row=np.arange(len(meta.kept)))
        good = good[good["row"].isin(list(where))].reset_index(drop=True)
        if good.empty:
            raise UserError(f"none of the {len(meta.kept)} images could be decoded (reasons: {Counter(bad.values())})")

        splits, tasks = {}, []
        by_split, before_balancing = _split_rows(good, opts, dataset)
        for split, rows in by_split.items():
            sizes = shards.shard_sizes(len(rows), opts.min_shards, opts.samples_per_shard)
            files = [f"{split}-{i:06d}.tar" for i in range(len(sizes))]
            entries = _entries(rows, where, dataset.codes)
            ends = np.cumsum(sizes).tolist()
            starts = [end - size for end, size in zip(ends, sizes, strict=True)]
            tasks += [(build.path / f, spool, entries[a:b]) for f, a, b in zip(files, starts, ends, strict=True)]
            splits[split] = _split_manifest(rows, files, sizes, dataset.codes)
        splits["train"]["class_counts_before_balancing"] = before_balancing
        with tqdm(total=sum(len(t[2]) for t in tasks), desc="shards", unit="sample", file=sys.stderr) as bar:
            for n in pool.imap_unordered(_write_shard, tasks):
                bar.update(n)
        spool.unlink()
        timings["shards"] = time.perf_counter() - started - sum(timings.values())

        manifest = {
            "classes": list(dataset.codes),
            "dataset": dataset.to_dict(),
            "groups": {"key": dataset.group_column, "own_groups": meta.own_groups, "ungrouped": meta.ungrouped},
            "rows": {"input": meta.n_input, "kept": len(good), "rejected": len(rejected)},
            "rejected_by_reason": dict(Counter(reason for _, reason in rejected).most_common()),
            # synthetic or real: the model card copies it
            "source": source.describe(opts.metadata, good, dataset.layout, dataset.group_column),
            "splits": splits,
            "image_size": opts.image_size,
            "jpeg_quality": images.JPEG_QUALITY,  # with image_size: how predict turns a file into a shard image
            "args": {k: _plain(v) for k, v in dataclasses.asdict(opts).items()},
            "seed": opts.seed,
            "version": __version__,
        }
        if opts.duplicates is not None:
            manifest["duplicates_listed"] = meta.duplicates_listed
        if meta.added is not None:
            manifest["added_ham10000"] = meta.added
        if manifest["rows"]["input"] != manifest["rows"]["kept"] + manifest["rows"]["rejected"]:
            raise RuntimeError(f"rows do not add up: {manifest['rows']}")  # a bug, never a user error
        summary = format_summary(manifest)
        shards.write_rejected(build.path / shards.REJECTED, rejected)
        (build.path / shards.SUMMARY).write_text(summary + "\n", encoding="utf-8")
        shards.write_json(build.path / shards.MANIFEST, manifest)  # last: its presence means complete
        build.commit()

    elapsed = time.perf_counter() - started
    print(summary)
    phases = ", ".join(f"{name} {t:.1f} s" for name, t in timings.items())
    print(f"wrote {out} in {elapsed:.1f} s ({len(meta.kept) / elapsed:.0f} images/s; {phases}; {workers} workers)")
    return PrepareResult(out=out, manifest=manifest)


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def format_summary(manifest: dict) -> str:
    """The closing table: rows in, dropped by reason, per-split class counts."""
    rows = manifest["rows"]
    lines = [f"rows: {rows['input']} in, {rows['kept']} kept, {rows['rejected']} rejected"]
    for reason, n in manifest["rejected_by_reason"].items():
        lines.append(f"  {reason:<40} {n:>6}")
    added = manifest.get("added_ham10000")
    if added:
        lines.append(
            f"  HAM10000: {added['rows']} rows added, {added['already_in_isic2019']} dropped as already in "
            "ISIC 2019 (same image_id)"
        )
    groups = manifest.get("groups", {})
    if groups.get("ungrouped"):
        lines.append(
            "  images were split without grouping (--allow-ungrouped, no group column): a patient or lesion "
            "may appear in train and test"
        )
    elif groups.get("own_groups"):
        lines.append(
            f"  {groups['own_groups']} kept rows have an empty {groups['key']}: each is its own group in the split"
        )
    classes = manifest["classes"]
    unit = {"lesion_id": "lesions", "patient_id": "patients"}.get(groups.get("key"), "groups")  # ISIC 2020: patients
    header = ["split", *classes, "total", "images", unit, "shards"]
    width = max(8, *(len(h) + 2 for h in header[1:]))  # a long class code or "patients" keeps a space before it
    lines.append(f"{header[0]:<6}" + "".join(f"{h:>{width}}" for h in header[1:]))
    for split, info in manifest["splits"].items():
        cells = [*(info["class_counts"][dx] for dx in classes), info["samples"], info["images"]]
        cells += [info["lesions"], info["shards"]]
        lines.append(f"{split:<6}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)
