"""Checkpoints that survive a kill at any moment, resume that picks the newest complete one, and exports.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00001234`` holding Accelerate's save_state
(model, optimizer, grad scaler, every rank's RNG) plus ``trainer_state.json`` (epoch, step, batches
already trained in the epoch, W&B run id, best metric). It is written under a temporary name and
renamed only after the ``COMPLETE`` marker is in place, so a run killed while saving leaves a
``.tmp-*`` folder that resume ignores. Resume also skips (with a warning) a folder that fails to load.
A save that fails on a full disk removes its ``.tmp-*`` folder and stops every rank with one line naming
the folder; the newest complete checkpoint is untouched, so resume takes it.

Exports for inference: ``model.pt`` is the bare torchvision state_dict (no DDP/compile prefixes, the
seed's format) and ``best.pt`` the best model with its metadata; both contain only tensors and plain
types, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from skinlesion.distributed import any_rank
from skinlesion.errors import UserError
from skinlesion.facts import FACTS_KEY, ModelFacts
from skinlesion.files import atomic_write, free_space, no_room_is_user_error, no_room_reason
from skinlesion.model import strip_wrapper_prefixes

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.pt"


@dataclass
class TrainerState:
    """Where training is; saved with every checkpoint."""

    epoch: int = 0  # the epoch in progress (or about to start)
    step: int = 0  # optimizer steps done since the start of the run
    batches_in_epoch: int = 0  # batches of `epoch` already trained on (per rank): resume skips them
    wandb_run_id: str | None = None
    best_metric: float | None = None  # best val_balanced_accuracy so far
    best_epoch: int | None = None
    arch: str | None = None  # model.name of the run: a checkpoint of another architecture is never loaded
    recipe: dict[str, Any] | None = None  # the run's config (Config.to_dict()): a resume must not change it


# What a resume may change: how long the run is, where its files are (a moved run or shards folder, a path
# spelled from another working directory), how it logs, checkpoints, loads and compiles, and where W&B files
# it. Everything else is the recipe (data, model, optimisation): changing it mid-run would train one run under
# two recipes while config.yaml and best.pt claim one. (data.num_workers changes the order in which samples
# arrive, not what is trained, and a requeue on another node may resolve `auto` differently.)
_RUN = ("epochs", "resume", "output_dir", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints")
_MACHINE = ("dist_timeout_s", "compile", "compile_backend")
_DATA = ("shards", "num_workers", "eval_batch_size", "augment", "decode")
MAY_CHANGE = frozenset(
    [f"train.{k}" for k in _RUN + _MACHINE]
    + [f"data.{k}" for k in _DATA]
    + [f"wandb.{k}" for k in ("mode", "project", "entity", "name", "group")]
)


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every recipe key that differs (keys in MAY_CHANGE excepted)."""
    changes = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(old) | set(new)):
            dotted = f"{section}.{key}"
            if dotted not in MAY_CHANGE and old.get(key) != new.get(key):
                changes.append(f"{dotted}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def read_state(path: Path) -> TrainerState:
    """A checkpoint's trainer_state.json, every field type-checked (a ValueError names the first bad one)."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    counts = ("epoch", "step", "batches_in_epoch")
    optional = {"wandb_run_id": str, "best_metric": (int, float), "best_epoch": int, "arch": str, "recipe": dict}
    for key, value in raw.items():
        if key in counts:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif key in optional:
            ok = value is None or (isinstance(value, optional[key]) and not isinstance(value, bool))
        else:
            raise ValueError(f"unknown key {key!r}")
        if not ok:
            raise ValueError(f"{key}={value!r} has the wrong type")
    return TrainerState(**raw)


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, state: TrainerState, keep: int, ema: nn.Module | None = None
) -> Path:
    """Collective: every rank writes its part into a temporary folder, rank 0 seals it and renames it.

    The EMA of the weights, when there is one, goes into ``ema.pt`` as plain tensors (read back with
    ``weights_only=True``), not through `Accelerator.register_for_checkpointing`, whose loader unpickles
    with ``weights_only=False``: a checkpoint folder from elsewhere could then run code.
    """
    root = checkpoints_dir(output_dir)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    failure = None
    if accelerator.is_main_process:
        failure = _attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
    accelerator.wait_for_everyone()
    if failure is None:
        failure = _attempt(lambda: accelerator.save_state(str(tmp), safe_serialization=True))
    _stop_if_any_failed(accelerator, failure, output_dir, tmp, final)
    if accelerator.is_main_process:
        failure = _attempt(lambda: _seal(tmp, final, state, ema))
        if failure is None:
            for old in complete_checkpoints(output_dir)[keep:]:
                shutil.rmtree(old, ignore_errors=True)
    _stop_if_any_failed(accelerator, failure, output_dir, tmp, final)  # also the closing barrier
    return final


def _seal(tmp: Path, final: Path, state: TrainerState, ema: nn.Module | None) -> None:
    """Main process: the EMA and trainer state, the marker last, then the rename that makes it a checkpoint."""
    if ema is not None:
        torch.save({k: v.detach().cpu() for k, v in ema.state_dict().items()}, tmp / EMA_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    (tmp / MARKER).write_text("")
    if final.exists():  # the same step saved again (e.g. after a resume): the new one wins
        shutil.rmtree(final)
    tmp.rename(final)


def _attempt(action: Callable[[], object]) -> Exception | None:
    """Run `action`; its exception is returned, so that every rank can learn of it before anyone raises."""
    try:
        action()
    except Exception as exc:  # a full disk surfaces as OSError, torch's RuntimeError or safetensors' own error
        return exc
    return None


def _stop_if_any_failed(
    accelerator: Accelerator, failure: Exception | None, output_dir: Path, tmp: Path, final: Path
) -> None:
    """Collective: when any rank failed to write, every rank stops; the half-written folder goes, and a full
    disk becomes one line naming the folder (the newest complete checkpoint is untouched: resume takes it)."""
    (failed_somewhere,) = any_rank(accelerator, int(failure is not None))
    if not failed_somewhere:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what it held; resume would skip it anyway
    if failure is not None and no_room_reason(failure) is None:
        raise failure  # not the disk: a bug, with its traceback
    reason = "another rank could not write its part" if failure is None else no_room_reason(failure)
    kept = complete_checkpoints(output_dir)
    previous = f"the previous checkpoint {kept[0].name} is complete and" if kept else "no checkpoint was kept yet, and"
    raise UserError(
        f"could not write checkpoint {final.name} in {final.parent}: {reason} ({free_space(final.parent)} free "
        f"there now); {previous} train.resume=auto resumes from it. Free space (or lower train.keep_checkpoints, "
        f"or choose another train.output_dir) and run again"
    ) from failure


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Sealed checkpoint folders, newest first; half-written ones (no marker) are skipped with a warning."""
    root = checkpoints_dir(output_dir)
    found = []
    for folder in sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []:
        if (folder / MARKER).is_file() and (folder / STATE_FILE).is_file():
            found.append(folder)
        else:
            log.warning("skipping checkpoint %s: it was not completely written", folder)
    return found


def load_checkpoint(
    accelerator: Accelerator,
    resume: str,
    output_dir: Path,
    arch: str,
    ema: nn.Module | None = None,
    recipe: dict[str, Any] | None = None,
) -> tuple[TrainerState, Path] | None:
    """Restore model, optimizer and RNG from the checkpoint `resume` names; None when there is none.

    ``auto`` tries the complete checkpoints newest first. One that is corrupt is skipped with a warning
    when an older one loads. One that does not fit this run (another architecture) stops the run, and so
    does a folder whose checkpoints all fail: starting from scratch there would overwrite metrics.jsonl,
    best.pt and the checkpoints of the run that wrote them. So does a checkpoint whose recorded recipe differs
    from `recipe` in any key outside MAY_CHANGE. A path must load or the run stops.
    """
    if resume == "never":
        return None
    candidates = complete_checkpoints(output_dir) if resume == "auto" else [Path(resume)]
    failures: list[tuple[Path, str]] = []
    for folder in candidates:
        try:
            state = read_state(folder / STATE_FILE)
        except (OSError, ValueError, TypeError) as exc:
            failures.append((folder, f"its {STATE_FILE} is unreadable ({exc})"))
            continue
        if state.arch is not None and state.arch != arch:
            failures.append((folder, f"it was saved by a model.name={state.arch} run, and this run has {arch}"))
            break  # a run of another model: never fall back past it
        changes = recipe_changes(state.recipe, recipe) if state.recipe is not None and recipe is not None else []
        if changes:
            raise UserError(
                f"cannot resume from {folder}: it was trained with another recipe ({'; '.join(changes[:4])}"
                f"{'; ...' if len(changes) > 4 else ''}). Nothing was overwritten; resume with the run's own "
                f"settings ({Path(output_dir) / 'config.yaml'}), or pass another train.output_dir. Keys a resume "
                f"may change: {', '.join(sorted(MAY_CHANGE))}"
            )
        if ema is not None and not (folder / EMA_FILE).is_file():
            failures.append((folder, "it was saved without train.ema_decay, and this run has an EMA"))
            break
        reason = None
        try:
            accelerator.load_state(str(folder))
            if ema is not None:
                ema.load_state_dict(torch.load(folder / EMA_FILE, map_location="cpu", weights_only=True))
        except Exception as exc:  # a corrupt file surfaces as any of safetensors/torch/json's errors
            reason = " ".join(str(exc).split())[:300]
        # Every rank must resume from the same checkpoint, even when only one rank's files are damaged.
        (failed_somewhere,) = any_rank(accelerator, int(reason is not None))
        if failed_somewhere:
            reason = reason or "another rank's files do not load"
            if any(s in reason for s in ("size mismatch", "Missing key", "Unexpected key")):
                failures.append((folder, f"its model does not fit model.name={arch} ({reason})"))
                break
            failures.append((folder, f"it does not load ({reason})"))
            continue
        for skipped, why in failures:
            log.warning("skipping checkpoint %s: %s", skipped, why)
        return state, folder
    if failures:
        newest, why = failures[0]
        older = f" ({len(failures) - 1} older checkpoint(s) failed too)" if len(failures) > 1 else ""
        raise UserError(
            f"cannot resume from {newest}: {why}{older}. Nothing was overwritten; pass another "
            f"train.output_dir for a new run, or the settings of the run that wrote these checkpoints"
        )
    return None


def bare_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The torchvision model's own state_dict on CPU, without DDP ("module.") or compile prefixes."""
    state = accelerator.get_state_dict(model)
    return {k: v.detach().cpu().clone() for k, v in strip_wrapper_prefixes(state).items()}


def export_model(state_dict: dict[str, torch.Tensor], path: Path, facts: ModelFacts) -> None:
    """model.pt: loadable by ``resnetXX(num_classes=7).load_state_dict(torch.load(path, weights_only=True))``.

    Its facts ride in ``_metadata`` (see `skinlesion.model`), so the file alone says how to use it.
    """
    plain = OrderedDict(state_dict)
    plain._metadata = OrderedDict({FACTS_KEY: facts.to_dict()})  # type: ignore[attr-defined]
    _export(path, plain)


def export_best(
    state_dict: dict[str, torch.Tensor], path: Path, *, facts: ModelFacts, epoch: int, step: int, metric: dict
) -> None:
    """best.pt: the model plus what inference needs to use it (arch, classes, image size) and why it is best."""
    payload: dict[str, Any] = {
        "model": state_dict,
        **facts.to_dict(),
        "epoch": epoch,
        "step": step,
        "metric": {"name": str(metric["name"]), "value": None if metric["value"] is None else float(metric["value"])},
    }
    _export(path, payload)


def _export(path: Path, obj: object) -> None:
    """torch.save, atomically: on a full disk the previous file stays whole, and the error is one line."""
    path = Path(path)
    kept = f"the previous {path.name} is untouched" if path.is_file() else f"no {path.name} was written"
    with no_room_is_user_error(path.parent, "train.output_dir", f"{kept}. Free space and run again"):
        atomic_write(path, lambda f: torch.save(obj, f))
