"""An exponential moving average of the weights (``train.ema_decay``), as torchvision's and timm's recipes ship.

Built on `torch.optim.swa_utils.AveragedModel` with `get_ema_multi_avg_fn` and ``use_buffers=True``, so
BatchNorm statistics are averaged too, rather than on a hand-written average. Its state goes into every
checkpoint as ``ema.pt`` (plain tensors, read with ``weights_only=True``; see `checkpoint.save_checkpoint`),
so a resumed run continues the same average.
"""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An EMA of `model` (the unwrapped module), or None when `decay` is 0 (off)."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
