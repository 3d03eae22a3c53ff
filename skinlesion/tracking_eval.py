"""An evaluation in W&B beyond scalars and PNGs: interactive charts, and the mistakes worth looking at.

`log_val_best` runs each time best.pt changes (a new best epoch), not every epoch: the charts and the
mistakes table then always describe the weights best.pt holds, a resumed run still has them for a best
epoch trained before the resume, and W&B stores one set of tables per improvement instead of per epoch
(the per-epoch PNGs and scalars already show the trend). `log_test_charts` runs once, for best.pt on test.
There is no mistakes table for test: looking through test errors is how a test set turns into a tuning set.

Everything comes from the `EvalResult` that the evaluator already returns (keys, labels, probabilities,
in key order), so the numbers are exactly those that chose best.pt. The table's thumbnails are the only
extra work: the ``jpg`` members of those <= 32 keys, read from the split's shards by tar header, decoded
with the same checks as predict; no other member is read and nothing is decoded but JPEG bytes.
Only the main process logs; without a W&B tracker every function returns before importing wandb.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from skinlesion.evaluate import EvalResult, Predictions
from skinlesion.tracking import wandb_run, warn

MISTAKES = 32  # rows of the most-confident-mistakes table
THUMBNAIL = 128  # px, longer side of a table image
MISTAKE_COLUMNS = ("image", "key", "image_id", "true", "predicted", "probability", "probability_true")


def png_images(accelerator: Accelerator, files: dict[str, Path], prefix: str) -> dict[str, Any]:
    """The PNGs the evaluator wrote, as W&B images under `prefix` (empty without a W&B tracker)."""
    if not files or wandb_run(accelerator) is None:
        return {}
    import wandb

    return {f"{prefix}/{name}": wandb.Image(str(p)) for name, p in files.items() if p.suffix == ".png"}


def log_val_best(
    accelerator: Accelerator, result: EvalResult, shards: Path, epoch: int, step: int, manifest: dict | None = None
) -> None:
    """Charts and the most-confident-mistakes table of the validation that made `epoch` the best, at `step`
    (the step its val/* scalars were logged at), under ``val_best/``."""
    if wandb_run(accelerator) is None:
        return
    try:
        values = charts(result.predictions, "val_best")
        values["val_best/mistakes"] = mistakes_table(result.predictions, Path(shards), "val", manifest=manifest)
        values["val_best/epoch"] = epoch
        accelerator.log(values, step=step)
    except Exception as exc:  # any W&B failure: warn, never end a training
        warn(f"logging the charts and mistakes of validation epoch {epoch}", exc)


def log_test_charts(accelerator: Accelerator, result: EvalResult) -> None:
    """Interactive confusion matrix and ROC of the test split (best.pt), beside the test PNGs."""
    if wandb_run(accelerator) is None:
        return
    try:
        accelerator.log(charts(result.predictions, "test"))
    except Exception as exc:  # any W&B failure: warn, never end a training
        warn("logging the test charts", exc)


def charts(preds: Predictions, prefix: str) -> dict[str, Any]:
    """``<prefix>/confusion_matrix_chart`` and ``<prefix>/roc_chart`` (W&B custom charts; the ``_chart``
    suffix keeps them apart from the PNGs logged as ``<prefix>/confusion_matrix`` and ``<prefix>/roc``)."""
    import wandb

    predicted = preds.probs.argmax(axis=1)
    title = f"{prefix}, n={len(preds.labels)}"
    values: dict[str, Any] = {
        f"{prefix}/confusion_matrix_chart": wandb.plot.confusion_matrix(
            y_true=preds.labels.tolist(),
            preds=predicted.tolist(),
            class_names=list(preds.classes),
            title=f"Confusion matrix, {title}",
        )
    }
    # wandb.plot.roc_curve reads column i of y_probas for the i-th class *present* in y_true, so with a class
    # missing from the split it would draw the wrong columns: give it only the present classes, renumbered.
    present = np.unique(preds.labels)
    if len(present) >= 2:  # one-vs-rest needs negatives
        values[f"{prefix}/roc_chart"] = wandb.plot.roc_curve(
            y_true=np.searchsorted(present, preds.labels),
            y_probas=preds.probs[:, present],
            labels=[preds.classes[c] for c in present],
            title=f"ROC one vs rest, {title}",
        )
    return values


def most_confident_mistakes(labels: np.ndarray, probs: np.ndarray, k: int = MISTAKES) -> np.ndarray:
    """Indices of the (at most) `k` misclassified samples, highest probability of the predicted class first;
    ties keep the samples' order (key order), so the table is the same whatever the number of processes."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probs[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:k]]


def mistakes_table(
    preds: Predictions, shards: Path, split: str, k: int = MISTAKES, manifest: dict | None = None
) -> Any:
    """A wandb.Table of the `k` most confident mistakes: thumbnail, key, image id, true and predicted class,
    the predicted class's probability and the true class's. Fewer rows when there are fewer mistakes."""
    import wandb

    chosen = most_confident_mistakes(preds.labels, preds.probs, k)
    images = read_jpegs(shards, split, {preds.keys[i] for i in chosen}, manifest)
    table = wandb.Table(columns=list(MISTAKE_COLUMNS))
    for i in chosen:
        true, predicted = int(preds.labels[i]), int(preds.probs[i].argmax())
        table.add_data(
            _thumbnail(images.get(preds.keys[i]), f"true {preds.classes[true]}, predicted {preds.classes[predicted]}"),
            preds.keys[i],
            preds.image_ids[i],
            preds.classes[true],
            preds.classes[predicted],
            float(preds.probs[i, predicted]),
            float(preds.probs[i, true]),
        )
    return table


def read_jpegs(shards: Path, split: str, keys: set[str], manifest: dict | None = None) -> dict[str, bytes]:
    """{key: jpg bytes} for `keys` from the shards that the manifest lists for `split`.

    A walk over tar headers (data of other members is skipped, not read) that stops once every key is
    found; the shard names come from the checked manifest and are opened as local files only.
    """
    from skinlesion.data.manifest import read_manifest, split_shards

    found: dict[str, bytes] = {}
    if not keys:
        return found
    for path, _ in split_shards(shards, manifest or read_manifest(shards), split):
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "jpg" and key in keys and member.isreg() and "/" not in member.name:
                    found[key] = tar.extractfile(member).read()
                    if len(found) == len(keys):
                        return found
    return found


def _thumbnail(data: bytes | None, caption: str) -> Any:
    """A wandb.Image at most THUMBNAIL px on its longer side, or None when the bytes are missing or bad."""
    import wandb

    from skinlesion.data.images import BadImage, decode_rgb

    if data is None:
        return None
    try:
        image = decode_rgb(data)
    except BadImage:
        return None
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return wandb.Image(image, caption=caption)
