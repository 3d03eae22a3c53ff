"""A model + a split of the shards -> clinical metrics, ISIC predictions.csv (+ ood.csv), report and plots.

The core (`evaluate`) is shared by `skinlesion evaluate` and by the trainer's per-epoch validation,
so best.pt is chosen by exactly the numbers the user later reads. It runs on every rank: each reads
its own shards through `pipeline.eval_loader` (every sample exactly once across ranks, no padding),
and `gather_object` hands every rank the complete, unpadded list of predictions. Samples are then
sorted by key, so 1, 2 or 8 processes produce the same confusion matrix and byte-identical files.
Metrics are computed on every rank (cheap, and every rank then agrees on "best"); files are written
by the main process only, each atomically, and they and the printed summary are rendered by `eval_outputs`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from skinlesion import inference
from skinlesion.data.datasets import HAM10000, of_manifest
from skinlesion.errors import UserError
from skinlesion.eval_outputs import summary_text, write_outputs
from skinlesion.inference import class_probabilities
from skinlesion.metrics import SPECIFICITIES, compute_metrics, selection, sensitivity_key
from skinlesion.ood import OODStats
from skinlesion.subgroups import subgroup_metrics


@dataclass(frozen=True)
class Predictions:
    """Every sample of a split, sorted by key: identical whatever the number of processes."""

    keys: list[str]
    image_ids: list[str]
    lesion_ids: list[str | None]
    labels: np.ndarray  # [N] class indices (the manifest's classes, in order)
    probs: np.ndarray  # [N, C] float64 softmax probabilities
    ood_scores: np.ndarray | None = None  # [N] the model card's OOD score (`ood.OODStats.scores`), if ood.pt exists
    metas: list[dict[str, Any]] | None = None  # [N] each sample's metadata (sex, age, site, dx_type: subgroups)
    classes: tuple[str, ...] = HAM10000.codes  # the manifest's classes: the columns of probs


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: its metrics (what metrics.json holds), predictions and written files.

    The trainer, the W&B logger and the CLI read it through `record`, `scalars` and `summary`, so the
    metric dict's key names are spelled here and in `metrics.compute_metrics` only.
    """

    metrics: dict[str, Any]
    predictions: Predictions
    files: dict[str, Path]  # empty unless outputs were written (main process, `out` given)

    @property
    def balanced_accuracy(self) -> float:
        return self.metrics["balanced_accuracy"]

    @property
    def score(self) -> tuple[str, float | None]:
        """What best.pt is chosen by (`selection`): balanced accuracy, or for a binary task (ISIC 2020) the AUC,
        or the loss where that AUC is undefined."""
        chosen = selection(self.metrics)
        return chosen["metric"], chosen["value"]

    def record(self, prefix: str = "val") -> dict[str, Any]:
        """The columns of metrics.jsonl, e.g. ``val_balanced_accuracy``."""
        m = self.metrics
        values = {
            "loss": m["log_loss"],
            "accuracy": m["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"],
            "auc_macro": m["auc_macro"],
            "mel_sensitivity": m["melanoma"]["sensitivity_at_argmax"],
            "samples": m["n_samples"],
        }
        return {f"{prefix}_{name}": value for name, value in values.items()}

    def scalars(self, prefix: str) -> dict[str, float]:
        """Flat "prefix/name" numbers for a tracker (W&B); undefined ones (None) left out."""
        m, mel = self.metrics, self.metrics["melanoma"]
        values: dict[str, float | None] = {
            "balanced_accuracy": m["balanced_accuracy"],
            "accuracy": m["accuracy"],
            "loss": m["log_loss"],
            "auc_macro": m["auc_macro"],
            "ece": m["ece"],
        }
        for spec in SPECIFICITIES:
            values[f"mel_sensitivity_at_spec_{spec:g}"] = mel[sensitivity_key(spec)]
        for dx, per_class in m["per_class"].items():
            values[f"recall/{dx}"] = per_class["recall"]
            values[f"auc/{dx}"] = per_class["auc"]
        return {f"{prefix}/{name}": float(v) for name, v in values.items() if v is not None}

    def summary(self) -> str:
        """The few lines a user reads after an evaluation (`eval_outputs.summary_text`)."""
        return summary_text(self.metrics, self.files)


def collect_predictions(
    model: nn.Module,
    accelerator: Accelerator,
    shards: Path,
    split: str,
    image_size: int,
    batch_size: int = 64,
    num_workers: int = 0,
    tta: bool = False,
    manifest: dict | None = None,
    ood: OODStats | None = None,
    loader: Iterable[dict[str, Any]] | None = None,
) -> Predictions:
    """Run `model` over `split` on every rank and gather all predictions on every rank.

    Must be called on all ranks together (gather_object is a collective). The model is unwrapped
    (no DDP forward, hence no collective per batch: ranks may hold different numbers of batches).
    With `ood` (the checkpoint's ood.pt), each image also gets the OOD score that serve and predict show.
    `loader`: the split's `eval_loader`, when the caller keeps one (training's validation keeps its
    workers for the run); by default a new one.
    """
    from skinlesion.data.augment import to_model_input
    from skinlesion.data.manifest import read_manifest
    from skinlesion.data.pipeline import eval_loader

    manifest = manifest or read_manifest(shards)  # first: a clear error for a missing folder or manifest
    if loader is None:
        loader = eval_loader(
            shards,
            split,
            image_size,
            batch_size,
            num_workers,
            accelerator.process_index,
            accelerator.num_processes,
            manifest=manifest,
        )
    expected = int(manifest["splits"][split]["samples"])
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    keys: list[str] = []
    metas: list[dict[str, Any]] = []
    labels: list[torch.Tensor] = []
    probs: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    bar = tqdm(
        total=expected if accelerator.num_processes == 1 else None,
        desc=f"evaluate {split}"
        + (f" (rank 0 of {accelerator.num_processes})" if accelerator.num_processes > 1 else ""),
        unit="img",
        disable=not accelerator.is_main_process,
        leave=False,
    )
    try:
        for batch in loader:
            images = to_model_input(batch["image"].to(accelerator.device, non_blocking=True))
            with accelerator.autocast():
                if ood is None:
                    probs.append(class_probabilities(net, images, tta=tta).cpu())
                else:  # serve's and predict's pass: probabilities, and features and contrast for the score
                    out = inference.run(net, batch["image"].to(accelerator.device), tta=tta)
                    probs.append(out.probs.cpu())
                    scores.append(ood.scores(out).cpu())
            labels.append(batch["label"])
            keys.extend(batch["key"])
            metas.extend(batch["meta"])
            bar.update(len(batch["key"]))
    finally:
        bar.close()
        net.train(was_training)

    local = {
        "keys": keys,
        "image_ids": [str(m.get("image_id", k)) for k, m in zip(keys, metas, strict=True)],
        "lesion_ids": [m.get("lesion_id") for m in metas],
        "metas": [{k: m.get(k) for k in ("sex", "age", "localization", "dx_type")} for m in metas],
        "labels": torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64),
        "probs": torch.cat(probs).double().numpy() if probs else np.zeros((0, len(manifest["classes"]))),
        "ood_scores": None if ood is None else torch.cat(scores).double().numpy() if scores else np.zeros(0),
    }
    parts = gather_object([local])  # one dict per rank, in rank order, on every rank
    preds = _merge(parts, expected, f"{shards}/manifest.json", split)
    return dataclasses.replace(preds, classes=tuple(manifest["classes"]))


def _merge(parts: list[dict[str, Any]], expected: int, manifest: str, split: str) -> Predictions:
    """Concatenate the ranks' parts, sort by key, and check that each sample was seen exactly once."""
    keys = [k for p in parts for k in p["keys"]]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    keys = [keys[i] for i in order]
    duplicates = {a for a, b in itertools.pairwise(keys) if a == b}
    if duplicates or len(keys) != expected:
        raise UserError(
            f"read {len(keys)} samples of the {split!r} split ({len(duplicates)} duplicate keys, e.g. "
            f"{sorted(duplicates)[:3]}) but {manifest} lists {expected}; the shards changed after prepare: "
            f"rerun `skinlesion prepare --overwrite`"
        )
    image_ids = [i for p in parts for i in p["image_ids"]]
    lesion_ids = [i for p in parts for i in p["lesion_ids"]]
    metas = [m for p in parts for m in p.get("metas", [{}] * len(p["keys"]))]
    return Predictions(
        keys=keys,
        image_ids=[image_ids[i] for i in order],
        lesion_ids=[lesion_ids[i] for i in order],
        metas=[metas[i] for i in order],
        labels=np.concatenate([p["labels"] for p in parts]).astype(np.int64)[order],
        probs=np.concatenate([p["probs"] for p in parts])[order],
        ood_scores=None
        if parts[0].get("ood_scores") is None
        else np.concatenate([p["ood_scores"] for p in parts])[order],
    )


def evaluate(
    model: nn.Module,
    accelerator: Accelerator,
    shards: Path,
    split: str,
    image_size: int,
    out: Path | None = None,
    checkpoint: Path | str | None = None,
    tta: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    n_bootstrap: int = 1000,
    plots: bool = True,
    manifest: dict | None = None,
    ood: OODStats | None = None,
    loader: Iterable[dict[str, Any]] | None = None,
) -> EvalResult:
    """Predict `split` on all ranks, compute metrics on all ranks, write files to `out` on the main one.

    Call it on every rank. `n_bootstrap=0` skips the confidence interval (e.g. per-epoch validation
    where only the point estimate is logged); `plots=False` skips the PNGs.
    """
    preds = collect_predictions(
        model, accelerator, shards, split, image_size, batch_size, num_workers, tta, manifest, ood, loader
    )
    from skinlesion.data.manifest import read_manifest, ungrouped_note

    manifest = manifest or read_manifest(shards)
    dataset = of_manifest(manifest, f"{shards}/manifest.json")
    groups = np.asarray(preds.lesion_ids, dtype=object) if all(preds.lesion_ids) else None
    metrics = compute_metrics(
        preds.labels, preds.probs, groups, n_bootstrap, classes=dataset.codes, malignant=dataset.malignant
    )
    metrics["group_key"] = dataset.group_column  # what the bootstrap resamples: lesions, or patients (ISIC 2020)
    metrics["split_notes"] = ungrouped_note(manifest)  # prepare --allow-ungrouped: patients may cross splits
    if split == "val":  # what training keeps best.pt by, on these numbers
        metrics["selection"] = selection(metrics)
    if n_bootstrap and preds.metas is not None:  # the final evaluations, not every epoch's validation
        metrics["subgroups"] = subgroup_metrics(
            preds.labels, preds.probs, preds.metas, dataset.codes, groups, n_bootstrap, malignant=dataset.malignant
        )
    metrics.update(
        checkpoint=None if checkpoint is None else str(checkpoint),
        split=split,
        shards=str(shards),
        image_size=image_size,
        tta=tta,
        processes=accelerator.num_processes,
    )
    files: dict[str, Path] = {}
    if out is not None and accelerator.is_main_process:
        files = write_outputs(Path(out), preds, metrics, plots=plots, dataset=dataset)
    return EvalResult(metrics=metrics, predictions=preds, files=files)
