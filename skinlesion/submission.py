"""The ISIC submission CSV of an evaluation: predictions.csv, in the layout of the dataset's challenge.

HAM10000: ISIC 2018 Task 3 (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC); ISIC 2019: its 8 classes and UNK; ISIC 2020:
image,target; a custom dataset: its class codes in capitals. The official scorer (``isic-challenge-scoring``)
reads it as it reads a challenge submission (tests/test_metrics.py, tests/test_datasets.py).
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

import numpy as np

from skinlesion.data.datasets import HAM10000, Dataset
from skinlesion.ood import OODStats

if TYPE_CHECKING:
    from skinlesion.evaluate import Predictions

ISIC_HEADER: tuple[str, ...] = ("image", *(column for column, _ in HAM10000.submission))  # ISIC 2018 Task 3
OOD_COLUMNS: tuple[str, ...] = ("ood_score", "ood_flag")


def isic_csv(preds: Predictions, dataset: Dataset = HAM10000) -> str:
    """The dataset's ISIC submission, one row per image_id: for HAM10000 ISIC 2018 Task 3's
    image,MEL,NV,BCC,AKIEC,BKL,DF,VASC; for ISIC 2019 its 8 classes and UNK (0: the model has no such class,
    its OOD check is the notice for it); for ISIC 2020 image,target (the melanoma probability).

    Probabilities are written in positional notation with a decimal point and enough digits to
    read back the exact float64, so the official scorer sees the numbers our metrics used. Resampled
    copies of one image (train split only) carry identical predictions; the first is kept.
    With OOD scores (a checkpoint with ood.pt), ``ood_score`` and ``ood_flag`` follow (1: above the card's
    threshold, an image the page and predict show their unfamiliar-image notice for).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ("image", *(column for column, _ in dataset.submission))
    writer.writerow(header + (OOD_COLUMNS if preds.ood_scores is not None else ()))
    columns = [None if code is None else dataset.codes.index(code) for _, code in dataset.submission]
    scores = preds.ood_scores if preds.ood_scores is not None else [None] * len(preds.image_ids)
    seen: set[str] = set()
    rows = sorted(zip(preds.image_ids, preds.probs, scores, strict=True), key=lambda r: r[0])
    for image_id, row, score in rows:
        if image_id in seen:
            continue
        seen.add(image_id)
        extra = [] if score is None else [repr(float(score)), int(score > OODStats.threshold)]
        cells = ["0.0" if c is None else np.format_float_positional(row[c], trim="0") for c in columns]
        writer.writerow([image_id, *cells, *extra])
    return buffer.getvalue()
