"""Synthetic ISIC 2019 and ISIC 2020 datasets in exactly their published layouts (`synth --layout ...`).

The parsers in `data.layouts` are tested against these files, so they carry what the real ones do:

- ISIC 2019: ISIC_2019_Training_GroundTruth.csv (``image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK``, one-hot
  floats, UNK never set), ISIC_2019_Training_Metadata.csv (``image,age_approx,anatom_site_general,
  lesion_id,sex``) and ISIC_2019_Training_Input/. About 8% of rows have no lesion_id (old archive
  images: NV, MEL and BKL only), and about 8% of ids end in ``_downsampled``, a suffix the file name has too.
  Class shares are 2019's (12,875 NV of 25,331), with a floor so every class exists in a small set.
- ISIC 2020: ISIC_2020_Training_GroundTruth.csv (``image_name,patient_id,sex,age_approx,
  anatom_site_general_challenge,diagnosis,benign_malignant,target``), train/, and
  ISIC_2020_Training_Duplicates.csv (``image_name_1,image_name_2``) listing byte-identical copies. About 16
  images per patient; melanoma is 1.76% as in 2020, but at least min(30, n/10) so a small set can be split.

Pictures come from `data.lesions` as for the HAM10000 set: a class's look is what tells it apart.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path

import numpy as np

from skinlesion.data.synthetic import _lesion_sizes, check_destination, write_images
from skinlesion.errors import UserError
from skinlesion.files import FolderLock, atomic_write, output_folder

LAYOUTS = ("isic2019", "isic2020")
GT_2019 = "ISIC_2019_Training_GroundTruth.csv"
META_2019 = "ISIC_2019_Training_Metadata.csv"
IMAGES_2019 = "ISIC_2019_Training_Input"
HEADER_2019 = ("image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
META_HEADER_2019 = ("image", "age_approx", "anatom_site_general", "lesion_id", "sex")
GT_2020 = "ISIC_2020_Training_GroundTruth.csv"
DUPLICATES_2020 = "ISIC_2020_Training_Duplicates.csv"
IMAGES_2020 = "train"
HEADER_2020 = (
    "image_name",
    "patient_id",
    "sex",
    "age_approx",
    "anatom_site_general_challenge",
    "diagnosis",
    "benign_malignant",
    "target",
)
FILES = {"isic2019": (GT_2019, META_2019, IMAGES_2019), "isic2020": (GT_2020, DUPLICATES_2020, IMAGES_2020)}

# ISIC 2019's images per class (25,331 in all), and the HAM10000 look each class is drawn with.
COUNTS_2019 = {"MEL": 4522, "NV": 12875, "BCC": 3323, "AK": 867, "BKL": 2624, "DF": 239, "VASC": 253, "SCC": 628}
LOOK = {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AK": "akiec", "BKL": "bkl", "DF": "df", "VASC": "vasc", "SCC": "scc"}
_SITES_2019 = (
    "anterior torso",
    "lower extremity",
    "head/neck",
    "upper extremity",
    "posterior torso",
    "palms/soles",
    "oral/genital",
    "lateral torso",
    "",
)
_SITES_2020 = ("torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital", "")
_BENIGN_2020 = (
    ("nevus", "nv", 0.9),
    ("seborrheic keratosis", "bkl", 0.04),
    ("lentigo NOS", "bkl", 0.03),
    ("lichenoid keratosis", "bkl", 0.03),
)
_SYNTH_IMAGE = re.compile(r"^ISIC_9\d{6}(_downsampled)?\.jpg$")


def counts_2019(n_images: int) -> dict[str, int]:
    """Images per ISIC 2019 class adding up to n_images: 2019's shares, at least max(3, 1%) each."""
    total = sum(COUNTS_2019.values())
    floor = min(max(3, n_images // 100), n_images // len(COUNTS_2019))
    counts = {c: max(int(n * n_images / total), floor) for c, n in COUNTS_2019.items()}
    counts["NV"] += n_images - sum(counts.values())
    return counts


def plan_2019(n_images: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows of a synthetic ISIC 2019 set: ground-truth and metadata columns, plus `_lesion`, `_shot`, `_look`."""
    rng = np.random.default_rng([seed, 2019])
    lesions = [(c, size) for c, n in counts_2019(n_images).items() for size in _lesion_sizes(rng, n, LOOK[c].lower())]
    order = rng.permutation(len(lesions))
    rows = []
    for lesion_no, i in enumerate(order):
        label, size = lesions[i]
        old_archive = label in ("NV", "MEL", "BKL") and size == 1 and rng.uniform() < 0.15
        age = "" if rng.uniform() < 0.02 else str(int(np.clip(5 * round(rng.normal(55, 17) / 5), 0, 85)))
        base = {
            "lesion_id": "" if old_archive else f"BCN_{9000000 + lesion_no:07d}",
            "age_approx": age,
            "anatom_site_general": _SITES_2019[int(rng.integers(len(_SITES_2019)))],
            "sex": "" if rng.uniform() < 0.02 else ("male" if rng.uniform() < 0.52 else "female"),
            "_label": label,
            "_look": LOOK[label],
            "_lesion": str(int(i)),
            "_downsampled": "1" if old_archive and rng.uniform() < 0.7 else "",
        }
        rows += [dict(base, _shot=str(shot)) for shot in range(size)]
    for n, row in enumerate(rows):
        row["image"] = f"ISIC_{9000000 + n:07d}" + ("_downsampled" if row["_downsampled"] else "")
        row.update({col: "1.0" if col == row["_label"] else "0.0" for col in HEADER_2019[1:]})
    return rows


def plan_2020(n_images: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows of a synthetic ISIC 2020 set (HEADER_2020's columns), plus `_lesion`, `_shot`, `_look`."""
    rng = np.random.default_rng([seed, 2020])
    n_mel = max(round(0.0176 * n_images), min(30, n_images // 10))
    n_patients = max(4, round(n_images / 16))
    patient_of = rng.integers(0, n_patients, size=n_images)
    is_mel = np.zeros(n_images, dtype=bool)
    is_mel[rng.choice(n_images, size=n_mel, replace=False)] = True
    sexes = ["male" if rng.uniform() < 0.52 else "female" for _ in range(n_patients)]
    ages = [int(np.clip(5 * round(rng.normal(50, 14) / 5), 10, 90)) for _ in range(n_patients)]
    rows = []
    for n in range(n_images):
        p = int(patient_of[n])
        if is_mel[n]:
            diagnosis, look = "melanoma", "mel"
        else:
            k = rng.choice(len(_BENIGN_2020), p=[w for *_, w in _BENIGN_2020])
            diagnosis, look = _BENIGN_2020[k][0] if rng.uniform() < 0.3 else "unknown", _BENIGN_2020[k][1]
        rows.append(
            {
                "image_name": f"ISIC_{9000000 + n:07d}",
                "patient_id": f"IP_{9000000 + p:07d}",
                "sex": "" if rng.uniform() < 0.01 else sexes[p],
                "age_approx": "" if rng.uniform() < 0.01 else f"{ages[p]}.0",
                "anatom_site_general_challenge": _SITES_2020[int(rng.integers(len(_SITES_2020)))],
                "diagnosis": diagnosis,
                "benign_malignant": "malignant" if is_mel[n] else "benign",
                "target": str(int(is_mel[n])),
                "_look": look,
                "_lesion": str(n),
                "_shot": "0",
            }
        )
    return rows


def generate_isic(
    out: Path, layout: str, n_images: int = 1000, seed: int = 0, workers: int | None = None, overwrite: bool = False
) -> Path:
    """Write a synthetic `layout` dataset into out (new or empty, or one of ours with `overwrite`); the CSVs
    are written last and atomically. Returns the ground-truth CSV's path."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r} is not one of ham10000, {', '.join(LAYOUTS)}")
    if n_images < 40:
        raise UserError(f"--images {n_images} is too few for --layout {layout}: pass at least 40")
    out = Path(out)
    check_destination(out, overwrite, FILES[layout])
    out = output_folder(out, "synth DIR")
    with FolderLock(out, "synth DIR"):
        check_destination(out, overwrite, FILES[layout])
        return _generate(out, layout, n_images, seed, workers)


def _generate(out: Path, layout: str, n_images: int, seed: int, workers: int | None) -> Path:
    rows = plan_2019(n_images, seed) if layout == "isic2019" else plan_2020(n_images, seed)
    name = "image" if layout == "isic2019" else "image_name"
    csvs, folder = [out / f for f in FILES[layout][:2]], out / FILES[layout][2]
    for path in csvs:
        path.unlink(missing_ok=True)  # from here until the end, the folder is visibly incomplete
    folder.mkdir(parents=True, exist_ok=True)
    planned = {f"{r[name]}.jpg" for r in rows}
    for stale in folder.glob("ISIC_9*.jpg"):
        if _SYNTH_IMAGE.match(stale.name) and stale.name not in planned:
            stale.unlink()
    tasks = [(seed, int(r["_lesion"]), int(r["_shot"]), r["_look"], str(folder / f"{r[name]}.jpg")) for r in rows]
    write_images(tasks, workers)
    if layout == "isic2019":
        atomic_write(out / META_2019, _csv(rows, META_HEADER_2019))
        atomic_write(out / GT_2019, _csv(rows, HEADER_2019))
        labels = [r["_label"] for r in rows]
        own = sum(not r["lesion_id"] for r in rows)
        detail = f"{own} without lesion_id, {sum(bool(r['_downsampled']) for r in rows)} _downsampled"
    else:
        pairs = _duplicate(rows, folder, np.random.default_rng([seed, 2021]))
        atomic_write(out / DUPLICATES_2020, _csv(pairs, ("image_name_1", "image_name_2")))
        atomic_write(out / GT_2020, _csv(rows, HEADER_2020))
        labels = ["MEL" if r["target"] == "1" else "other" for r in rows]
        detail = f"{len({r['patient_id'] for r in rows})} patients, {len(pairs)} listed duplicate pairs"
    shares = ", ".join(f"{c} {labels.count(c)}" for c in dict.fromkeys(sorted(labels)))
    print(f"wrote {len(rows)} {layout} images to {out} ({shares}; {detail})")
    return out / FILES[layout][0]


def _duplicate(rows: list[dict[str, str]], folder: Path, rng: np.random.Generator) -> list[dict[str, str]]:
    """ISIC 2020 lists 425 pairs of one photo under two names: copy ~1.3% of the images over another of the
    same patient and class, and list each pair."""
    pairs = []
    by_patient: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in rows:
        by_patient.setdefault((r["patient_id"], r["target"]), []).append(r)
    candidates = [group for group in by_patient.values() if len(group) >= 2]
    for k in rng.permutation(len(candidates))[: max(1, round(0.013 * len(rows)))]:
        first, second = candidates[int(k)][:2]
        shutil.copyfile(folder / f"{first['image_name']}.jpg", folder / f"{second['image_name']}.jpg")
        pairs.append({"image_name_1": first["image_name"], "image_name_2": second["image_name"]})
    return pairs


def _csv(rows: list[dict[str, str]], header: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
