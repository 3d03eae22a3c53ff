"""Training losses for a long-tailed label distribution: ``train.loss = ce | weighted_ce | logit_adjusted | focal``.

HAM10000 is two-thirds nevi, and melanoma, the class that matters most, is one image in nine. The class
counts come from the manifest, never from the data stream, so every rank builds the same loss.

- ``ce``: cross entropy, the default. It fits a balanced train split, which is what
  ``prepare --samples-per-class`` writes.
- ``weighted_ce``: cross entropy weighted by inverse class frequency in the train split as written
  (manifest ``class_counts``). It is for an unbalanced train split, when resampling is not wanted.
- ``logit_adjusted``: Menon et al. 2021. The training logits get ``tau * log(prior)`` added, with the priors
  taken from the train split's counts *before* balancing (``class_counts_before_balancing``). The model then
  learns balanced-error logits, and prediction uses the raw logits. It is meant for a train split that was
  not resampled. On a resampled split the natural priors still apply, but resampling has already done part
  of the correction.
- ``focal``: Lin et al. 2017, ``-(1 - p)^gamma log p``. It down-weights the many easy examples.

Label smoothing (``train.label_smoothing``) applies to every one of them. Each takes integer targets or
the class probabilities that MixUp and CutMix make (`skinlesion.mixing`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import nn

from skinlesion.config import TrainConfig
from skinlesion.errors import UserError
from skinlesion.labels import CLASSES


def _classes(manifest: dict) -> list[str]:
    """The manifest's classes in head order (HAM10000's for a manifest that predates them)."""
    return list(manifest.get("classes") or CLASSES)


def _counts(manifest: dict, key: str) -> torch.Tensor:
    counts = manifest["splits"].get("train", {}).get(key)
    classes = _classes(manifest)
    if not isinstance(counts, dict) or not all(isinstance(counts.get(dx), int) for dx in classes):
        raise UserError(f"the manifest's splits.train.{key} is missing or malformed; rerun `skinlesion prepare`")
    return torch.tensor([float(counts[dx]) for dx in classes])


def _smoothed(target: torch.Tensor, n: int, smoothing: float) -> torch.Tensor:
    """Class indices [B] or class probabilities [B, n] (MixUp/CutMix) -> smoothed probabilities, as
    `nn.CrossEntropyLoss` smooths both."""
    q = target.float() if target.is_floating_point() else nnf.one_hot(target, n).float()
    return q * (1 - smoothing) + smoothing / n


class LogitAdjusted(nn.Module):
    """Cross entropy on logits + tau * log(prior): Menon et al. 2021, eq. 10."""

    def __init__(self, priors: torch.Tensor, tau: float, label_smoothing: float) -> None:
        super().__init__()
        self.register_buffer("shift", tau * torch.log(priors / priors.sum()))
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nnf.cross_entropy(logits + self.shift.to(logits.dtype), target, label_smoothing=self.label_smoothing)


class Focal(nn.Module):
    """Focal loss on (smoothed) one-hot targets: mean over samples of sum_c q_c (1 - p_c)^gamma (-log p_c)."""

    def __init__(self, gamma: float, label_smoothing: float) -> None:
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = logits.float().log_softmax(dim=1)
        q = _smoothed(target, logits.shape[1], self.label_smoothing)
        return (q * (1 - log_p.exp()).pow(self.gamma) * -log_p).sum(dim=1).mean()


def make_criterion(cfg: TrainConfig, manifest: dict) -> nn.Module:
    """The loss `cfg.loss` names, built from the manifest's class counts where it needs them."""
    if cfg.loss == "ce":
        return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if cfg.loss == "weighted_ce":
        counts = _counts(manifest, "class_counts")
        if (counts == 0).any():
            missing = [dx for dx, n in zip(_classes(manifest), counts.tolist(), strict=True) if n == 0]
            raise UserError(f"train.loss=weighted_ce: the train split has no {', '.join(missing)} samples to weigh")
        weights = counts.sum() / (len(counts) * counts)
        return nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    if cfg.loss == "logit_adjusted":
        key = "class_counts_before_balancing"
        counts = _counts(manifest, key if key in manifest["splits"].get("train", {}) else "class_counts")
        return LogitAdjusted(counts.clamp(min=1), cfg.loss_tau, cfg.label_smoothing)
    return Focal(cfg.focal_gamma, cfg.label_smoothing)
