"""Weights & Biases through Accelerate's tracker: which mode, which run, where its files go.

Only the main process talks to W&B (Accelerate's tracker guards every call). Without an API key a run
is offline by default, so a laptop or an air-gapped cluster node never blocks on a login prompt; the
files land in ``<output_dir>/wandb/offline-run-*`` for a later ``wandb sync``. The run id is kept in
each checkpoint, so a resumed (e.g. requeued) job continues the same W&B run instead of starting one.

Artifacts give the run its lineage: the dataset's manifest.json is an input (`log_dataset`) and best.pt with
what serving and reproducing it need is the output (`log_model`). W&B copies every file it will upload
(artifacts, and the tables it stores as artifacts) into a staging folder, by default under the home
directory, where an offline run's copies stay until ``wandb sync``; here that folder is
``<output_dir>/wandb/artifacts/staging`` (unless WANDB_DATA_DIR is set), so the output folder alone
carries everything its offline runs need to sync, and nothing piles up in a shared home.
W&B is a report, not the product: any failure here is a warning, never the end of a finished training.
With wandb.mode=disabled there is no tracker, and nothing here imports wandb.
"""

from __future__ import annotations

import json
import netrc
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from skinlesion.config import Config


def has_api_key() -> bool:
    """True when W&B could log in without asking: WANDB_API_KEY, or `wandb login`'s netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts  # reads ~/.netrc (or $NETRC); never printed
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def resolve_mode(mode: str) -> str:
    """``auto`` -> online with an API key, offline without; a WANDB_MODE set by the user wins over auto."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if has_api_key() else "offline"


def log_with(cfg: Config) -> str | None:
    """What to pass to Accelerator(log_with=...): no tracker at all when W&B is disabled."""
    return None if resolve_mode(cfg.wandb.mode) == "disabled" else "wandb"


def new_run_id() -> str:
    """A W&B-compatible run id (lowercase letters and digits), made before W&B starts so checkpoints carry it.

    WANDB_RUN_ID wins when set: `wandb agent` sets it for each run of a W&B sweep, and an id of our own would
    open a second run outside the sweep (the id is passed to wandb.init explicitly, which beats the variable).
    """
    return os.environ.get("WANDB_RUN_ID") or secrets.token_hex(6)


def start_run(accelerator: Accelerator, cfg: Config, run_id: str | None, config: dict[str, Any]) -> None:
    """Open (or, with the id of a resumed run, continue) the W&B run on the main process; W&B's staging
    folder goes under ``<output_dir>/wandb`` unless the user chose one with WANDB_DATA_DIR."""
    if log_with(cfg) is None:
        return
    output_dir = Path(cfg.train.output_dir)
    os.environ.setdefault("WANDB_DATA_DIR", str(output_dir.resolve() / "wandb"))  # read by W&B at each staging
    accelerator.init_trackers(
        cfg.wandb.project,
        config=_flatten(config),
        init_kwargs={
            "wandb": {
                "id": run_id,
                "resume": "allow",
                "dir": str(output_dir),
                "mode": resolve_mode(cfg.wandb.mode),
                "name": cfg.wandb.name or output_dir.name,
                "entity": cfg.wandb.entity,
                "group": cfg.wandb.group,
            }
        },
    )


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: W&B's config accepts only flat scalar values here."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


MODEL_FILES = ("best.pt", "model_card.json", "ood.pt", "config.yaml")  # those present go into the model artifact


def wandb_run(accelerator: Accelerator) -> Any | None:
    """The wandb Run on the main process while a W&B tracker runs; None on other ranks and without a tracker.

    Looking it up imports nothing, so callers can return before any wandb work when W&B is off.
    """
    if not accelerator.is_main_process:
        return None
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            return getattr(tracker, "run", None)
    return None


def warn(what: str, exc: BaseException) -> None:
    """A W&B step failed: say so on stderr and carry on (the training's own outputs are already on disk)."""
    print(
        f"warning: W&B: {what} failed ({type(exc).__name__}: {exc}); the run's files are unaffected",
        file=sys.stderr,
        flush=True,
    )


def artifact_name(text: str, fallback: str) -> str:
    """`text` as a W&B artifact name (letters, digits, ``-_.``, at most 128 characters)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:128]
    return name or fallback


def log_dataset(accelerator: Accelerator, shards: Path) -> None:
    """The shards' manifest.json as a `dataset` artifact that the run uses, so its lineage names its data.

    The manifest lists every shard with its sample and class counts, the split seed and prepare's arguments,
    so the same prepared folder is the same artifact version and a re-prepared one is a new version. The
    images themselves stay out (gigabytes; the shards are byte-identical for the same inputs and seed).
    """
    run = wandb_run(accelerator)
    if run is None:
        return
    try:
        import wandb

        path = Path(shards) / "manifest.json"
        manifest = json.loads(path.read_text(encoding="utf-8"))
        splits = {
            name: {"samples": info.get("samples"), "class_counts": info.get("class_counts")}
            for name, info in manifest.get("splits", {}).items()
        }
        metadata = {
            "shards": str(shards),
            "splits": splits,
            "image_size": manifest.get("image_size"),
            "seed": manifest.get("seed"),
            "version": manifest.get("version"),
        }
        name = artifact_name(Path(shards).resolve().name, "dataset")
        description = f"manifest.json of the shards in {shards}"
        artifact = wandb.Artifact(name, type="dataset", description=description, metadata=metadata)
        artifact.add_file(str(path))
        if run.offline:
            # run.use_artifact refuses offline runs, but what it does for a new artifact is exactly this: log it
            # flagged "use after commit", a flag the offline record keeps and `wandb sync` acts on.
            run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
        else:
            run.use_artifact(artifact)
    except Exception as exc:  # any W&B failure: warn, never end a training
        warn(f"logging {shards}/manifest.json as a dataset artifact", exc)


def log_model(accelerator: Accelerator, out: Path) -> None:
    """best.pt as a `model` artifact aliased ``best`` and ``epoch-N`` (N: best.pt's own epoch field).

    model_card.json and ood.pt go with it when present (`skinlesion serve` reads both beside the
    checkpoint), and config.yaml, the run's resolved config and runtime, so the artifact alone can be
    served and its training reproduced.
    """
    run = wandb_run(accelerator)
    if run is None:
        return
    out = Path(out)
    try:
        import torch
        import wandb

        best = torch.load(out / "best.pt", map_location="cpu", weights_only=True, mmap=True)  # no tensor is read
        metadata = {key: best.get(key) for key in ("arch", "classes", "image_size", "epoch", "step", "metric")}
        name = artifact_name(f"model-{run.id}", "model")
        description = f"best.pt of {out} (epoch {best['epoch']}) with its model card and config"
        artifact = wandb.Artifact(name, type="model", description=description, metadata=metadata)
        for file in MODEL_FILES:
            if (out / file).is_file():
                artifact.add_file(str(out / file))  # copied to staging now: a later best.pt cannot change it
        run.log_artifact(artifact, aliases=["best", f"epoch-{int(best['epoch'])}"])
    except Exception as exc:  # any W&B failure: warn, never end a training
        warn(f"logging {out}/best.pt as a model artifact", exc)
