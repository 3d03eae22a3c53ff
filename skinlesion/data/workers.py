"""How many loader worker processes a training process may start (``data.num_workers``).

The count has to come from the cores this process may really run on, not from the machine's: under SLURM
a job gets ``--cpus-per-task`` cores (1 unless asked), pinned by the affinity mask where the cluster binds
tasks and only announced in SLURM_CPUS_PER_TASK / SLURM_CPUS_ON_NODE where it does not; ``taskset`` and
container runtimes narrow the mask too. ``os.cpu_count()`` sees none of that, so a formula built on it
forks far more decoders than there are cores.

Two mistakes are caught here rather than left to the DataLoader (which only warns):

* an explicit count above the cores this process may use (``data.num_workers=1000``) is refused: every
  worker is a process that decodes on a core of its own, and extra ones only add memory (each holds a
  copy of the stream and a prefetch queue) until the machine runs out of it;
* ``auto`` never silently means 0 on a GPU run. Decoding in the training process stalls the GPU between
  steps, so a GPU run gets at least one worker even on 1-2 cores, and a warning when the workers cannot
  keep a GPU busy (about 1,000 images/s per worker at 224 px, docs/benchmarks.md, against 4,000+ images/s
  a GPU trains ResNet-50). On CPU, training and decoding compete for the same cores: a worker on a core
  the training process needs buys nothing, so ``auto`` may be 0 there, and the log says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from skinlesion.errors import UserError

# Fewer workers than this leave one GPU waiting for data (ResNet-50, 224 px): ~1,000 images/s per worker.
GPU_WORKERS = 4
# What to ask SLURM for per GPU in the shipped sbatch lines: GPU_WORKERS workers and more, plus the process.
CORES_PER_GPU = 8


@dataclass(frozen=True)
class Cores:
    """The cores this process's job step may use, what said so, and how many training processes share them."""

    count: int
    seen: str  # e.g. "affinity mask 128, SLURM_CPUS_PER_TASK=64"
    processes: int  # training processes on this machine that share `count` (accelerate/torchrun's local ranks)

    @property
    def share(self) -> int:
        """Cores per training process, at least 1 (a process runs somewhere even when ranks outnumber cores)."""
        return max(1, self.count // self.processes)


@dataclass(frozen=True)
class Workers:
    """The resolved count, and the one line the main process prints about it (None: nothing to say)."""

    count: int
    note: str | None


def available_cores(env: dict[str, str] | None = None) -> Cores:
    """The cores of this process's affinity mask, capped by SLURM's allocation when the job runs under SLURM
    (SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE): a cluster without CPU binding shows every core of the
    node in the mask but granted only the allocation."""
    env = dict(os.environ if env is None else env)
    mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    count, seen = mask, [f"affinity mask {mask}"]
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        granted = _positive(env.get(key))
        if granted is not None:
            count = min(count, granted)
            seen.append(f"{key}={granted}")
            break
    processes = _positive(env.get("LOCAL_WORLD_SIZE")) or 1
    return Cores(count, ", ".join(seen), processes)


def resolve_workers(setting: int | str, gpu: bool, env: dict[str, str] | None = None) -> Workers:
    """``data.num_workers`` for this process: an explicit count if the cores allow it, else ``auto``:
    this process's share of the cores less one for the process itself (it queues the GPU's work), at least 1
    on a GPU. One GPU on 16 cores: 15; 8 GPUs on 64 cores: 7 each; a GPU on 1 core: 1, with a warning."""
    cores = available_cores(env)
    if setting != "auto":
        count = int(setting)
        if count > cores.count:
            raise UserError(
                f"data.num_workers={count} is more than the {cores.count} core(s) this process may use "
                f"({cores.seen}): each worker is a process that needs a core of its own. Set data.num_workers=auto "
                f"or at most {cores.count}, or run on more cores (sbatch --cpus-per-task)"
            )
        return Workers(count, None)
    spare = cores.share - 1
    count = max(1, spare) if gpu else max(0, spare)
    per = f"{cores.count} core(s) for {cores.processes} training process(es) ({cores.seen})"
    if gpu and count < GPU_WORKERS:
        return Workers(
            count,
            f"warning: data.num_workers=auto: {per} leave {count} loader worker(s) per GPU, about {count * 1000:,} "
            f"images/s: the GPU will wait for data. Give each GPU {CORES_PER_GPU} cores (sbatch --cpus-per-task="
            f"{CORES_PER_GPU} x GPUs per node), or set data.decode=device",
        )
    if count == 0:
        return Workers(
            0,
            f"data.num_workers=auto: 0 loader workers: {per}; on CPU each training process decodes its own "
            "batches, as a worker would on the same core",
        )
    return Workers(count, f"data.num_workers=auto: {count} loader worker(s) per training process: {per}")


def _positive(text: str | None) -> int | None:
    """A positive integer from an environment variable, or None (unset, empty, or not a count)."""
    try:
        value = int(str(text).split("(")[0])  # SLURM writes repeated counts as "8(x2)"
    except ValueError:
        return None
    return value if value > 0 else None
