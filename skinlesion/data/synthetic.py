"""A synthetic HAM10000-style dataset, so the whole pipeline runs with no download.

The metadata mimics HAM10000: its exact header, its class shares (with a floor so every class exists
even in a few hundred images), lesions photographed several times, and a few rows the seed's
cleaning rules drop (null age, 'unknown' sex or localization).

Each image is a dermoscopy-like picture whose class is carried by what a dermatologist looks at
(`data.lesions`: colour, shape, border, texture and size, each buried in nuisance variation).

Lesion parameters come from a generator seeded by (seed, lesion), shot parameters from (seed,
lesion, shot): images of one lesion look alike, and the dataset is identical for a seed whatever
the number of worker processes. Pictures are rendered at half resolution with numpy and upscaled,
which keeps 10,015 images well under a minute on two cores.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from skinlesion.data.lesions import make_lesion, render
from skinlesion.data.pool import worker_pool
from skinlesion.errors import UserError
from skinlesion.files import FolderLock, atomic_write, output_folder
from skinlesion.labels import CLASSES

# HAM10000's header (= metadata.COLUMNS; not imported from there, which would import pandas for nothing).
HEADER = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset")
FOLDERS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
METADATA = "HAM10000_metadata.csv"
_SYNTH_IMAGE = re.compile(r"^ISIC_9\d{6}\.jpg$")  # the ids `plan` gives

# Image shares of the 7 classes in HAM10000 (6705 nv of 10,015 images ...).
SHARES = {"akiec": 0.0327, "bcc": 0.0513, "bkl": 0.1097, "df": 0.0115, "mel": 0.1111, "nv": 0.6695, "vasc": 0.0142}
# Mean patient age per class in HAM10000 (rounded); age spread is 14 years.
_AGE = {"akiec": 67, "bcc": 67, "bkl": 59, "df": 52, "mel": 61, "nv": 47, "vasc": 50}
_DX_TYPE = {
    "nv": (("follow_up", 0.55), ("histo", 0.32), ("consensus", 0.10), ("confocal", 0.03)),
    "df": (("histo", 0.45), ("consensus", 0.55)),
    "vasc": (("histo", 0.5), ("consensus", 0.5)),
}
_LOCALIZATION = (
    "back",
    "lower extremity",
    "trunk",
    "upper extremity",
    "abdomen",
    "face",
    "chest",
    "foot",
    "neck",
    "scalp",
    "hand",
    "ear",
    "genital",
    "acral",
)
_LOC_WEIGHTS = np.array([2192, 2077, 1404, 1118, 1022, 745, 407, 319, 168, 128, 90, 56, 48, 7], dtype=float)
_DATASETS = ("vidir_molemax", "vidir_modern", "rosendahl", "vienna_dias")


def class_counts(n_images: int) -> dict[str, int]:
    """Images per class: HAM10000's shares, at least max(3, 1%) each (fewer only for tiny n).

    Largest-remainder rounding makes the counts add up to exactly n_images.
    """
    if n_images < len(CLASSES):
        raise ValueError(f"n_images must be at least {len(CLASSES)} (one per class), got {n_images}")
    floor = min(max(3, n_images // 100), n_images // len(CLASSES))
    raw = {dx: max(SHARES[dx] * n_images, floor) for dx in CLASSES}
    # Take the floor's extra images from nv, the majority class.
    raw["nv"] -= sum(raw.values()) - n_images
    counts = {dx: math.floor(v) for dx, v in raw.items()}
    by_remainder = sorted(CLASSES, key=lambda dx: counts[dx] - raw[dx])
    for dx in by_remainder[: n_images - sum(counts.values())]:
        counts[dx] += 1
    return counts


def _lesion_rng(seed: int, lesion: int, shot: int | None = None) -> np.random.Generator:
    key = [seed, lesion] if shot is None else [seed, lesion, shot + 1]
    return np.random.default_rng(key)


def write_images(tasks: list[tuple[int, int, int, str, str]], workers: int | None) -> None:
    """Render and save each (seed, lesion, shot, dx, path), over `workers` processes, with a progress bar: the
    HAM10000 layout's and the ISIC layouts' (`synthetic_isic`) images alike."""
    workers = workers or os.cpu_count() or 1
    with tqdm(total=len(tasks), desc="synth", unit="img", dynamic_ncols=True) as bar:
        if workers == 1:
            for task in tasks:
                _write_image(task)
                bar.update()
        else:
            with worker_pool(workers) as pool:
                for _ in pool.imap_unordered(_write_image, tasks, chunksize=16):
                    bar.update()


def _write_image(task: tuple[int, int, int, str, str]) -> None:
    seed, lesion, shot, dx, path = task
    pic = render(make_lesion(_lesion_rng(seed, lesion), dx), _lesion_rng(seed, lesion, shot))
    pic.save(path, format="JPEG", quality=88)


def _lesion_sizes(rng: np.random.Generator, n: int, dx: str) -> list[int]:
    """Images per lesion adding up to n: HAM10000 has 1.34 images per lesion, melanoma more."""
    p_single = 0.55 if dx == "mel" else 0.75
    sizes = []
    while sum(sizes) < n:
        size = 1 if rng.uniform() < p_single else int(rng.choice([2, 2, 2, 3, 3, 4, 5]))
        sizes.append(min(size, n - sum(sizes)))
    return sizes


def plan(n_images: int, seed: int = 0) -> list[dict[str, str]]:
    """The metadata rows (HEADER's columns, as text) of a synthetic dataset; row i is image i."""
    rng = np.random.default_rng([seed, 2**31])
    lesions: list[tuple[str, int]] = []
    for dx, n in class_counts(n_images).items():
        lesions += [(dx, size) for size in _lesion_sizes(rng, n, dx)]
    order = rng.permutation(len(lesions))
    # Incomplete rows, as in HAM10000 (0.6% null age, 0.6% unknown sex, 2.3% unknown localization),
    # all on nv lesions so that small classes keep their images; at least one of each from 100 images on.
    nv = [i for i in order if lesions[i][0] == "nv"]
    flaw_counts = [max(int(n_images >= 100), round(f * n_images / 1.34)) for f in (0.006, 0.006, 0.023)]
    flawed = rng.choice(nv, size=min(len(nv), sum(flaw_counts)), replace=False).tolist()
    flaws = {}
    for kind, count in zip(("age", "sex", "localization"), flaw_counts, strict=True):
        flaws.update({lesion: kind for lesion in flawed[:count]})
        flawed = flawed[count:]

    rows = []
    for lesion_no, i in enumerate(order):
        dx, size = lesions[i]
        kinds = _DX_TYPE.get(dx, (("histo", 1.0),))
        dx_type = kinds[rng.choice(len(kinds), p=[w for _, w in kinds])][0]
        age = str(int(np.clip(5 * round(rng.normal(_AGE[dx], 14) / 5), 0, 85)))
        sex = "male" if rng.uniform() < 0.54 else "female"
        site = _LOCALIZATION[rng.choice(len(_LOCALIZATION), p=_LOC_WEIGHTS / _LOC_WEIGHTS.sum())]
        flaw = flaws.get(i)
        row = {
            "lesion_id": f"HAM_{9000000 + lesion_no:07d}",
            "dx": dx,
            "dx_type": dx_type,
            "age": "" if flaw == "age" else age,
            "sex": "unknown" if flaw == "sex" else sex,
            "localization": "unknown" if flaw == "localization" else site,
            "dataset": _DATASETS[int(rng.integers(len(_DATASETS)))],
            "_lesion": str(int(i)),
        }
        rows += [dict(row, _shot=str(shot)) for shot in range(size)]
    for n, row in enumerate(rows):
        row["image_id"] = f"ISIC_{9000000 + n:07d}"
    return rows


def generate(
    out: Path, n_images: int = 1000, seed: int = 0, workers: int | None = None, overwrite: bool = False
) -> Path:
    """Write out/HAM10000_metadata.csv and n_images JPEGs (600x450) over the two part folders.

    OUT must be new or empty (hidden files aside); with `overwrite`, a previous synthetic dataset in it
    is replaced: its CSV is removed first, so a half-rewritten folder never looks complete, and images
    of the old plan that the new one lacks are deleted, nothing else. Images are rendered by worker
    processes; the CSV is written last and atomically. Returns the CSV's path.
    """
    if n_images < len(CLASSES):
        raise UserError(f"--images {n_images} is too few: pass at least {len(CLASSES)}, one per class")
    out = Path(out)
    check_destination(out, overwrite)
    out = output_folder(out, "synth DIR")
    with FolderLock(out, "synth DIR"):
        check_destination(out, overwrite)  # again, under the lock
        return _generate(out, n_images, seed, workers)


def check_destination(out: Path, overwrite: bool, ours: tuple[str, ...] = (*FOLDERS, METADATA)) -> None:
    """OUT must be new or empty (hidden files aside), or, with `overwrite`, hold only the names in `ours`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; pass a folder for the synthetic dataset")
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if not visible:
        return
    ours_only = set(visible) <= set(ours)
    if not overwrite:
        hint = "pass --overwrite to replace the synthetic dataset in it" if ours_only else "pass an empty or new folder"
        raise UserError(f"{out} is not empty ({', '.join(visible[:3])}); {hint}")
    if not ours_only:
        shown = ", ".join(visible[:3])
        raise UserError(f"{out} holds files synth did not write ({shown}); pass an empty or new folder")


def _generate(out: Path, n_images: int, seed: int, workers: int | None) -> Path:
    rows = plan(n_images, seed)
    csv_path = out / METADATA
    csv_path.unlink(missing_ok=True)  # from here until the end, the folder is visibly incomplete
    for folder in FOLDERS:
        (out / folder).mkdir(parents=True, exist_ok=True)
    half = (len(rows) + 1) // 2
    tasks = [
        (seed, int(r["_lesion"]), int(r["_shot"]), r["dx"], str(out / FOLDERS[n >= half] / f"{r['image_id']}.jpg"))
        for n, r in enumerate(rows)
    ]
    planned = {Path(t[-1]).name for t in tasks}
    for folder in FOLDERS:  # images of an earlier, larger plan would otherwise linger beside the new ones
        for stale in (out / folder).glob("ISIC_9*.jpg"):
            if _SYNTH_IMAGE.match(stale.name) and stale.name not in planned:
                stale.unlink()
    write_images(tasks, workers)

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HEADER, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(csv_path, buffer.getvalue())
    counts = class_counts(n_images)
    print(
        f"wrote {len(rows)} images of {len({r['lesion_id'] for r in rows})} lesions to {out} "
        f"({', '.join(f'{dx} {counts[dx]}' for dx in CLASSES)})"
    )
    return csv_path
