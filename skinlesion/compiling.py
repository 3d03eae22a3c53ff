"""torch.compile for the training model (``train.compile``): its cache, and what it cost.

The compile cache goes under the run's folder (``<output_dir>/compile-cache``) unless TORCHINDUCTOR_CACHE_DIR
is set: Inductor's default is /tmp, which is node-local, so a requeued job on another node would compile
from scratch. With the cache in the run folder, a requeue or resume reuses the compiled kernels (Inductor's
FX-graph and AOTAutograd caches; torch decides what it can reuse).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def compile_model(model: nn.Module, backend: str, out: Path) -> nn.Module:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(out).resolve() / "compile-cache"))
    return torch.compile(model, backend=backend)


def graphs() -> int:
    """Graphs Dynamo has compiled in this process so far: one per graph break and per recompile."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
