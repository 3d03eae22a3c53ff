"""The process pool of `prepare` and `synth`, whose workers start with signal handling fit for a worker.

A forked worker inherits its parent's Python signal handlers. A parent that had installed one that only
records SIGTERM (the trainer's stop flag, left installed in a process that had trained in-process, as the
test suite does) passed it on to every worker, and ``Pool.terminate`` (what the end of a ``with Pool(...)``
block runs) sends SIGTERM and then waits: forever, for workers that ignore it. So each worker resets:

- SIGTERM to its default action: terminate() and a scheduler's kill end it;
- SIGINT and SIGUSR1 to "ignore". They are addressed to the job (Ctrl-C reaches the terminal's whole process
  group, SLURM's preemption warning every process of a step), and the parent decides what to do. A worker
  killed in the middle of a task would leave that task unfinished, and `Pool` waits for it forever.
"""

from __future__ import annotations

import signal
from multiprocessing.pool import Pool

WORKER_SIGNALS = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.SIG_IGN, signal.SIGUSR1: signal.SIG_IGN}


def worker_pool(workers: int) -> Pool:
    """``multiprocessing.Pool(workers)`` whose workers reset their signal handlers first (see the module doc)."""
    return Pool(workers, initializer=_reset_signals)


def _reset_signals() -> None:
    for sig, action in WORKER_SIGNALS.items():
        signal.signal(sig, action)
