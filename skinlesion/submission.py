"""The ISIC submission CSV of an evaluation (predictions.csv, in the layout of the dataset's challenge) and the
out-of-distribution scores that go beside it (ood.csv).

HAM10000: ISIC 2018 Task 3 (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC); ISIC 2019: its 8 classes and UNK; ISIC 2020:
image_name,target, as the challenge's sample submission names them; a custom dataset: image and its class codes
in capitals. predictions.csv holds those columns and nothing else, because the official scorer
(``isic-challenge-scoring``) refuses a file with any other column ("Extra columns in CSV"), and so would a
challenge upload: the OOD scores once appended to it made every file unscoreable. They live in ood.csv, keyed
by the same image ids (tests/test_metrics.py and tests/test_datasets.py score both layouts the scorer reads).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from skinlesion.data.datasets import HAM10000, Dataset
from skinlesion.ood import OODStats

if TYPE_CHECKING:
    from skinlesion.evaluate import Predictions

OOD_HEADER: tuple[str, ...] = ("image", "ood_score", "ood_flag")
# The image-id column of each challenge: `image` for the ISIC 2016-2019 scorer; the ISIC 2020 (Kaggle) sample
# submission calls it image_name. Keyed by layout, which every prepared manifest records, old ones included.
ID_COLUMN = {"isic2020": "image_name"}


def submission_header(dataset: Dataset = HAM10000) -> tuple[str, ...]:
    """The exact header of `dataset`'s challenge submission."""
    return (ID_COLUMN.get(dataset.layout, "image"), *(column for column, _ in dataset.submission))


def _unique(preds: Predictions) -> Iterator[tuple[int, str]]:
    """(row index, image id) once per image_id, sorted by id: resampled copies of one image (train split only)
    carry identical predictions, and a submission has one row per image; the first copy is kept."""
    seen: set[str] = set()
    for index in sorted(range(len(preds.image_ids)), key=lambda i: preds.image_ids[i]):
        image_id = preds.image_ids[index]
        if image_id not in seen:
            seen.add(image_id)
            yield index, image_id


def isic_csv(preds: Predictions, dataset: Dataset = HAM10000) -> str:
    """The dataset's ISIC submission, one row per image_id: for HAM10000 ISIC 2018 Task 3's
    image,MEL,NV,BCC,AKIEC,BKL,DF,VASC; for ISIC 2019 its 8 classes and UNK (0: the model has no such class,
    its OOD check is the notice for it); for ISIC 2020 image_name,target (the melanoma probability).
    Nothing else: see the module docstring, and `ood_csv` for the OOD scores.

    Probabilities are written in positional notation with a decimal point and enough digits to
    read back the exact float64, so the official scorer sees the numbers our metrics used.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(submission_header(dataset))
    columns = [None if code is None else dataset.codes.index(code) for _, code in dataset.submission]
    for index, image_id in _unique(preds):
        row = preds.probs[index]
        cells = ["0.0" if c is None else np.format_float_positional(row[c], trim="0") for c in columns]
        writer.writerow([image_id, *cells])
    return buffer.getvalue()


def ood_csv(preds: Predictions) -> str | None:
    """ood.csv: image,ood_score,ood_flag for the same images and in the same order as predictions.csv
    (ood_flag 1: above the card's threshold, an image the page and predict show their unfamiliar-image
    notice for); None without OOD scores (no ood.pt matching the checkpoint)."""
    if preds.ood_scores is None:
        return None
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(OOD_HEADER)
    for index, image_id in _unique(preds):
        score = float(preds.ood_scores[index])
        writer.writerow([image_id, repr(score), int(score > OODStats.threshold)])
    return buffer.getvalue()
