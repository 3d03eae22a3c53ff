"""What the launcher asked for, a process group that really matches it, and preemption signals.

Launchers describe the job in environment variables: torchrun and `accelerate launch` set WORLD_SIZE,
RANK and LOCAL_RANK; `srun` alone sets SLURM_NTASKS and SLURM_PROCID. Two traps are handled here:

* Without CUDA, Accelerate only forms a process group when asked for CPU explicitly, so `accelerate
  launch --multi_gpu` or `torchrun` on a CPU box starts N processes that each train alone and all exit
  0. We pass ``cpu=True`` whenever there is no CUDA (gloo DDP), and then check that the process group
  Accelerate built has as many processes as the launcher started; a mismatch is an error, never a
  silent N-fold single-process run.
* Preemption (SLURM's --signal, a scheduler's SIGTERM) arrives at arbitrary points on arbitrary ranks.
  The handlers only set a flag; ranks agree on it, and on the loss's health, every
  ``train.log_every_steps`` optimizer steps (`StepCheck`), and stop together after a checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from skinlesion import __version__
from skinlesion.errors import UserError
from skinlesion.files import FolderLock


@dataclass(frozen=True)
class LaunchInfo:
    """The job as the launcher described it."""

    launcher: str  # accelerate | torchrun | slurm | none
    world_size: int
    rank: int
    local_rank: int


def launch_info(env: dict[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's environment (accelerate launch, torchrun, srun, or a plain process)."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env:
        launcher = "accelerate" if any(k.startswith("ACCELERATE_") for k in env) else "torchrun"
        return LaunchInfo(launcher, int(env["WORLD_SIZE"]), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return LaunchInfo("slurm", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)))
    return LaunchInfo("none", 1, 0, 0)


def _adopt_slurm_tasks(info: LaunchInfo) -> None:
    """srun started the ranks itself (no torchrun/accelerate): export the variables torch.distributed reads."""
    if "MASTER_ADDR" not in os.environ:
        raise UserError(
            f"srun started {info.world_size} tasks but MASTER_ADDR is not set, so they cannot form a process "
            f"group; run `accelerate launch` (see slurm/) or export MASTER_ADDR=<first node> MASTER_PORT=<port>"
        )
    os.environ.update(
        WORLD_SIZE=str(info.world_size), RANK=str(info.rank), LOCAL_RANK=str(info.local_rank), LOCAL_WORLD_SIZE="1"
    )
    os.environ.setdefault("MASTER_PORT", "29500")


def resolve_mixed_precision(requested: str) -> str:
    """``auto``: the launcher's choice (ACCELERATE_MIXED_PRECISION), else bf16 on a GPU that has it, else no."""
    if requested != "auto":
        return requested
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(
    mixed_precision: str, timeout_s: int, log_with: str | None = None, project_dir: str | None = None
) -> Accelerator:
    """An Accelerator whose process group is the one the launcher started, over gloo when there is no CUDA."""
    info = launch_info()
    if info.launcher == "slurm":
        _adopt_slurm_tasks(info)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolve_mixed_precision(mixed_precision),
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
    )
    if accelerator.num_processes != info.world_size:
        raise UserError(
            f"the launcher ({info.launcher}) started {info.world_size} processes but the process group has "
            f"{accelerator.num_processes}: each would train alone. Launch with `accelerate launch --config_file "
            f"launch/cpu-2proc.yaml` (CPU) or launch/multi-gpu.yaml, or `torchrun --nproc_per_node N`"
        )
    return accelerator


class StopSignal:
    """Remembers a SIGUSR1/SIGTERM; the run stops at the next `StepCheck`, when all ranks agree.

    `restore` puts back the handlers that were there before `install`: a process that trains and then goes
    on (a test, a notebook, `bench`) must not keep ignoring SIGTERM, or a multiprocessing pool it starts
    later waits forever for workers that inherited the flag-only handler and never exit."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = 0  # signal number, 0 for none
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        while self._previous:
            sig, handler = self._previous.popitem()
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum  # only a flag: a handler must not checkpoint or touch collectives


class StepCheck:
    """The loop's one read-back: every N steps, are all ranks' losses finite, and did any rank get a signal?

    A read of a device value makes the CPU wait until the GPU has finished everything queued, so the next
    step cannot be queued while the GPU works. Checking the loss at every step (and agreeing with the other
    ranks) did that three times a step. Instead each step queues, on the device, "the first step whose loss
    was not finite" (`observe`, no read), and `agree` reads it together with the stop flag and the last
    step's loss, all ranks reduced, in one transfer: one synchronisation per check. The trainer calls
    `agree` every ``train.log_every_steps`` steps, at the end of an epoch and before every checkpoint, so a
    non-finite loss is found at most that many steps late and never reaches a saved file, and a preemption
    signal stops all ranks together within that many steps.
    """

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), math.inf, device=device)  # the first step with a non-finite loss
        self.bad_loss = torch.zeros((), device=device)  # that step's loss
        self.last_loss = torch.zeros((), device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Queue this step's verdict on the device; nothing is read back."""
        loss = loss.detach().float()
        new = torch.logical_and(~torch.isfinite(loss), torch.isinf(self.first_bad))
        self.first_bad = torch.where(new, step, self.first_bad)
        self.bad_loss = torch.where(new, loss, self.bad_loss)
        self.last_loss = loss

    def agree(self, accelerator: Accelerator, stop: int) -> tuple[int, int | None, float, float | None]:
        """(stop signal of any rank or 0, first non-finite step of any rank or None, mean last loss over
        ranks, this rank's non-finite loss value or None): one read-back."""
        flags = torch.stack([torch.full_like(self.first_bad, float(stop)), -self.first_bad])
        mean = self.last_loss.clone()[None]
        if accelerator.num_processes > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.all_reduce(mean, op=torch.distributed.ReduceOp.SUM)
        values = torch.cat([flags, mean, self.first_bad[None], self.bad_loss[None]]).tolist()
        signum, neg_first, total, mine, bad = values
        first = None if math.isinf(neg_first) else int(-neg_first)
        return int(signum), first, total / accelerator.num_processes, None if math.isinf(mine) else bad


def any_rank(accelerator: Accelerator, *values: int) -> list[int]:
    """Element-wise maximum of small integers over all ranks (one all-reduce): how ranks agree to stop."""
    flags = torch.tensor(values, dtype=torch.int64, device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags.tolist()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name if signum else "none"


def lock_on_main(accelerator: Accelerator, folder: Path, what: str) -> FolderLock:
    """The main process locks `folder`; if it cannot, every rank stops (one output folder, one writer)."""
    lock, error = FolderLock(folder, what), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except UserError as exc:
            error = exc
    (failed,) = any_rank(accelerator, int(error is not None))
    if failed:
        raise error or UserError(f"the main process could not lock {folder}; see its error")
    return lock


def runtime_info(accelerator: Accelerator) -> dict[str, Any]:
    """Where and with what a run ran: recorded in config.yaml and the W&B config, for reproducing it."""
    import accelerate
    import torchvision
    import webdataset

    return {
        "world_size": accelerator.num_processes,
        "launcher": launch_info().launcher,
        "device": str(accelerator.device.type),
        "distributed_type": str(accelerator.distributed_type.value),
        "mixed_precision": accelerator.mixed_precision,
        "versions": {
            "skinlesion": __version__,
            "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "accelerate": accelerate.__version__,
            "webdataset": webdataset.__version__,
        },
    }
