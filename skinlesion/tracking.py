"""Weights & Biases through Accelerate's tracker: which mode, which run, where its files go.

Only the main process talks to W&B (Accelerate's tracker guards every call). Without an API key a run
is offline by default, so a laptop or an air-gapped cluster node never blocks on a login prompt; the
files land in ``<output_dir>/wandb/offline-run-*`` for a later ``wandb sync``. The run id is kept in
each checkpoint, so a resumed (e.g. requeued) job continues the same W&B run instead of starting one.
"""

from __future__ import annotations

import netrc
import os
import secrets
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
    """Open (or, with the id of a resumed run, continue) the W&B run on the main process."""
    if log_with(cfg) is None:
        return
    output_dir = Path(cfg.train.output_dir)
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
