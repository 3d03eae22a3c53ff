"""A checkpoint on a split of the shards: what `skinlesion evaluate` runs, and what training runs on best.pt at
the end, so both report the same way. The checkpoint is loaded and checked against the shards (classes,
malignant classes, the split's samples) before any folder is made; every folder written is locked against a
second writer (`_writer_locks`); the numbers come from `skinlesion.evaluate`; with `--split val` the model
card and ood.pt are written beside the checkpoint (`skinlesion.card`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator

from skinlesion.data.datasets import of_manifest
from skinlesion.errors import UserError
from skinlesion.evaluate import EvalResult, evaluate
from skinlesion.files import FolderLock, atomic_write
from skinlesion.model import LoadedModel


def evaluate_checkpoint(
    accelerator: Accelerator,
    checkpoint: Path,
    shards: Path,
    split: str,
    out: Path,
    *,
    manifest: dict | None = None,
    image_size: int | None = None,
    tta: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    lock: bool = True,
    loaded: LoadedModel | None = None,
) -> tuple[EvalResult, LoadedModel]:
    """Load `checkpoint` and evaluate it on `split`, writing to `out`: what `skinlesion evaluate` does, and
    what training does with best.pt when it finishes, so both report the same way. Call it on every rank.
    `skinlesion evaluate` passes the model it `loaded` from `checkpoint`, and `lock=False`: it holds `out`'s
    lock already (`_writer_locks`)."""
    from skinlesion.data.manifest import read_manifest, verify_split
    from skinlesion.distributed import lock_on_main
    from skinlesion.files import output_folder
    from skinlesion.model import load_for_inference
    from skinlesion.report import Calibration

    manifest = manifest or read_manifest(shards)
    if split not in manifest["splits"]:
        raise UserError(f"{shards}/manifest.json has no {split!r} split (it has {sorted(manifest['splits'])})")
    if manifest["splits"][split]["samples"] == 0:
        raise UserError(
            f"the {split!r} split of {shards} is empty (0 samples): nothing to evaluate; choose another "
            "--split, or prepare with a non-zero fraction for it"
        )
    loaded = loaded or load_for_inference(checkpoint, image_size=image_size)
    if list(loaded.classes) != list(manifest["classes"]):
        raise UserError(
            f"{checkpoint} predicts the classes {list(loaded.classes)}, but {shards} holds {manifest['classes']}: "
            "evaluate it on shards prepared with the --dataset it was trained on"
        )
    verify_split(shards, manifest, split)
    out = output_folder(out, "--out")
    held = lock_on_main(accelerator, out, "--out") if lock else None
    loaded.model.to(accelerator.device)
    try:  # predict's and serve's OOD statistics, when a card for this checkpoint is beside it (else no columns)
        ood = Calibration.load(checkpoint, loaded).ood
    except UserError:  # a damaged card or ood.pt: `--split val` rewrites both
        ood = None
    try:
        result = evaluate(
            loaded.model,
            accelerator,
            shards,
            split,
            loaded.image_size,
            out=out,
            checkpoint=checkpoint,
            tta=tta,
            batch_size=batch_size,
            num_workers=num_workers,
            manifest=manifest,
            ood=ood,
        )
    finally:
        if held is not None:
            held.release()
    return result, loaded


def _writer_locks(accelerator: Accelerator, checkpoint: Path, split: str, out: Path) -> list[FolderLock]:
    """Lock each folder `skinlesion evaluate` writes into, or stop if another writer holds one: --out, every
    folder above it that skinlesion locks (a training holds its output_dir and rewrites eval-val in it each
    epoch), and with --split val the checkpoint's folder, where the card and ood.pt go (if it is writable:
    if not, the card is skipped with a note). A running training's folder used to get all three written."""
    from skinlesion.distributed import lock_on_main
    from skinlesion.files import locked_parents, output_folder

    out = Path(out).resolve()
    folders = dict.fromkeys(locked_parents(out), "--out (it is inside a folder that another command writes)")
    folder = checkpoint.resolve().parent
    if split == "val" and folder != out and os.access(folder, os.W_OK):
        folders[folder] = "--checkpoint folder (--split val writes model_card.json and ood.pt there)"
    locks: list[FolderLock] = []
    try:  # the enclosing folders first: --out is made only when nobody holds them
        for path, what in folders.items():
            locks.append(lock_on_main(accelerator, path, what))
        locks.append(lock_on_main(accelerator, output_folder(out, "--out"), "--out"))
    except BaseException:
        for held in locks:
            held.release()
        raise
    return locks


def evaluate_command(
    checkpoint: Path,
    shards: Path,
    split: str = "test",
    out: Path | None = None,
    tta: bool = False,
    image_size: int | None = None,
) -> int:
    """CLI entry: evaluate `checkpoint` on `split` of `shards`; outputs go to <checkpoint dir>/eval-<split>."""
    from skinlesion.data.manifest import read_manifest
    from skinlesion.distributed import make_accelerator
    from skinlesion.model import load_for_inference

    checkpoint, shards = Path(checkpoint), Path(shards)
    manifest = read_manifest(shards)  # a missing folder fails here, before any process group forms
    # The trainer's helper: gloo DDP on CPU, and an error if the launcher's ranks did not all join.
    accelerator = make_accelerator("auto", timeout_s=1800)
    workers = 4 if torch.cuda.is_available() else 0  # on CPU, loader workers only steal the model's cores
    out = Path(out) if out is not None else checkpoint.parent / f"eval-{split}"
    loaded = load_for_inference(checkpoint, image_size=image_size)  # a bad checkpoint stops before any folder is made
    if split == "val":  # the card's cut-offs are measured on the checkpoint's malignant classes: the shards must agree
        from skinlesion.card import check_malignant

        described = of_manifest(manifest, f"{shards}/manifest.json")
        if tuple(loaded.classes) == described.codes:  # other classes altogether: evaluate_checkpoint says so
            check_malignant(loaded.malignant, described, checkpoint, shards)
    locks = _writer_locks(accelerator, checkpoint, split, out)
    try:
        options = {"tta": tta, "num_workers": workers, "lock": False, "loaded": loaded}
        result, loaded = evaluate_checkpoint(accelerator, checkpoint, shards, split, out, manifest=manifest, **options)
        if accelerator.is_main_process:
            print(result.summary())
            if split == "val":  # the validation split is what the model card's thresholds come from
                _write_card(loaded, checkpoint, shards)
    finally:
        for lock in locks:
            lock.release()
    accelerator.end_training()
    return 0


def _write_card(loaded: LoadedModel, checkpoint: Path, shards: Path) -> None:
    """model_card.json and ood.pt beside `checkpoint`, keeping the test figures of an earlier card for the
    same weights (by digest: a card of other weights, with the same file name, keeps nothing)."""
    from skinlesion.card import CARD, calibrate, load_card

    try:
        previous = load_card(checkpoint) or {}
    except UserError:
        previous = {}  # a damaged card is rewritten
    try:
        card = calibrate(loaded.model, checkpoint, shards, loaded.image_size, loaded.arch, malignant=loaded.malignant)
        if previous.get("test") and previous.get("weights_sha256") == card["weights_sha256"]:
            card["test"] = previous["test"]
            atomic_write(checkpoint.parent / CARD, json.dumps(card, indent=2) + "\n")
        print(f"wrote {checkpoint.parent}/{CARD} and ood.pt")
    except UserError as exc:
        print(f"note: no model card written: {exc}")
    except OSError as exc:
        print(f"note: no model card written: {checkpoint.parent} is not writable ({exc.strerror})")
