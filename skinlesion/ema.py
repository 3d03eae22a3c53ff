"""An exponential moving average of the weights (``train.ema_decay``), as torchvision's and timm's recipes ship.

Built on `torch.optim.swa_utils.AveragedModel` (``use_buffers=True``, so BatchNorm statistics are averaged
too), with its state in every checkpoint as ``ema.pt`` (plain tensors, read with ``weights_only=True``; see
`checkpoint.save_checkpoint`), so a resumed run continues the same average.

`update_parameters` is our own, for one reason: AveragedModel's reads its step counter, a device tensor,
twice per update (``bool(n_averaged == 0)`` and ``if n_averaged > 0``), and each read makes the CPU wait for
the GPU to finish the step before it can queue the next one. Here the host keeps a mirror of "has it started",
set at construction and when a checkpoint is loaded, so an update only queues one `torch._foreach_lerp_`.
The average itself is AveragedModel's EMA formula; integer buffers (BatchNorm's batch counter) are copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class EMA(AveragedModel):
    """``ema = decay * ema + (1 - decay) * weights``, parameters and buffers; the first update copies."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, use_buffers=True)
        self.decay = decay
        self._started = False  # host mirror of n_averaged > 0: never read from the device in the loop

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        floats = [(a, b) for a, b in zip(mine, theirs, strict=True) if a.is_floating_point()]
        if self._started and floats:
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1 - self.decay)
        else:
            torch._foreach_copy_([a for a, _ in floats], [b for _, b in floats])
        for a, b in zip(mine, theirs, strict=True):
            if not a.is_floating_point():
                a.copy_(b)
        self.n_averaged += 1
        self._started = True

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._started = bool(self.n_averaged > 0)  # one read, when a checkpoint is loaded: outside the loop
        return result


def make_ema(model: nn.Module, decay: float) -> EMA | None:
    """An EMA of `model` (the unwrapped module), or None when `decay` is 0 (off)."""
    return EMA(model, decay) if decay > 0 else None
