"""Count the training loop's host read-backs per epoch, for whichever skinlesion is first on PYTHONPATH.

    PYTHONPATH=<checkout> python benchmarks/host_sync/count.py SHARDS [key=value ...]

On a GPU each read-back (`.item()`, `bool(t)`, `.tolist()`, `torch.tensor(list)` onto the device) makes the
CPU wait for the GPU. On the CPU they are counted instead: `aten._local_scalar_dense`, `aten.lift_fresh` and
`Tensor.tolist`, while the trainer runs an epoch's steps (loader workers are other processes). Works on any
checkout whose `skinlesion.train` has `train_epoch(run, state, ...)`, so an old and a new one can be compared in
one run (docs/benchmarks.md). Prints one JSON line: [[steps, reads], ...] per epoch.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import skinlesion.train as train_module
from skinlesion.config import load_config

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default}


class Count(TorchDispatchMode):
    reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func in READS
        return func(*args, **(kwargs or {}))


def main(shards: str, overrides: list[str]) -> None:
    counted, real_epoch, real_tolist = [], train_module.train_epoch, torch.Tensor.tolist

    def epoch(run, state, *rest):
        counter, step = Count(), state.step

        def tolist(self):
            counter.reads += 1
            return real_tolist(self)

        torch.Tensor.tolist = tolist
        with counter:
            stats = real_epoch(run, state, *rest)
        torch.Tensor.tolist = real_tolist
        counted.append([state.step - step, counter.reads])
        return stats

    train_module.train_epoch = epoch
    from skinlesion.data.transforms import normalize

    normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))  # per-process constants, made once
    with tempfile.TemporaryDirectory() as out:
        base = [f"data.shards={shards}", f"train.output_dir={out}", "wandb.mode=disabled", "data.num_workers=1"]
        config = Path(train_module.__file__).resolve().parents[1] / "configs" / "smoke.yaml"
        train_module.train(load_config(config, base + overrides))
    print(json.dumps(counted))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
