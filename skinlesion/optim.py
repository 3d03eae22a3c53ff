"""The optimizer and its learning-rate schedule: parameter groups, warmup + cosine, fine-tuning rates.

Kept apart from the loop so that `train.train_epoch` only says "set this step's rates" and the rules for
them (which parameters decay, what the backbone gets, what "frozen" means) are in one place.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from skinlesion.config import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD; weight decay on weights only (not on BatchNorm parameters or biases).

    The fc head and the backbone are separate groups (flag ``backbone``), so that `set_lr` can give the
    backbone train.backbone_lr_mult of the rate, or none while it is frozen (train.freeze_backbone_epochs).
    Freezing by learning rate, not by requires_grad, keeps the set of parameters with gradients fixed,
    which DDP requires; AdamW's decoupled weight decay scales with the rate, so a frozen weight does not move.

    The fused implementations (one kernel for all parameters, on CUDA and on the CPU) keep their step counts
    on the device: the default ones keep them on the host and read them back at every step (`.item()` per
    parameter), which on a CPU looks exactly like a device synchronisation (tests/test_host_sync.py).
    """
    groups = []
    for head in (False, True):
        params = [p for name, p in model.named_parameters() if name.startswith("fc.") == head]
        for decay in (True, False):
            groups.append(
                {
                    "params": [p for p in params if (p.ndim > 1) == decay],
                    "backbone": not head,
                    "weight_decay": cfg.weight_decay if decay else 0.0,
                }
            )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, fused=True)
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(groups, lr=cfg.lr, fused=True)


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over `warmup` steps, then cosine decay to cfg.min_lr_ratio * cfg.lr at `total`."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, cfg: TrainConfig, frozen: bool) -> None:
    """The head gets `lr`; the backbone `lr * backbone_lr_mult`, or 0 while frozen. Taken from the config,
    not from the groups: a resumed optimizer's groups hold whatever the checkpointed run had."""
    for group in optimizer.param_groups:
        group["lr"] = lr * ((0.0 if frozen else cfg.backbone_lr_mult) if group["backbone"] else 1.0)


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers to eval mode: while the backbone is frozen its running statistics stay as loaded."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def scaled_schedule(cfg: TrainConfig, global_batch: int) -> TrainConfig:
    """train.reference_batch: the recipe's lr and ema_decay are for that global batch. Another world size
    keeps the same schedule per image: lr scales linearly with the global batch, and the EMA decay per
    step is decay ** (global / reference), so it averages over as many images (torchvision's recipes adjust
    their EMA the same way)."""
    if not cfg.reference_batch or global_batch == cfg.reference_batch:
        return cfg
    scale = global_batch / cfg.reference_batch
    return dataclasses.replace(cfg, lr=cfg.lr * scale, ema_decay=cfg.ema_decay**scale)
