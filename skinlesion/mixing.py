"""MixUp and CutMix on the training device: ``train.mixup_alpha``, ``train.cutmix_alpha``, ``train.mix_prob``.

The references people compare against (torchvision's classification recipes, timm) train with one of the
two per batch, and so does this: it is torchvision's `v2.MixUp` / `v2.CutMix` inside `v2.RandomChoice`, with
the same formulas, applied to the augmented, normalised batch on the device after the loader, so the
loader's samples stay independent and a mixed pair can come from any two shards. Each draws one mixing
weight per batch and pairs every sample with its neighbour (``roll(1)``); targets become class
probabilities that sum to 1.

Why not torchvision's transforms themselves: they draw their parameters as tensors and read them back
(``.item()``, `one_hot`'s range check on a CPU), so the training step would read tensors on the host. That
costs nothing on a GPU for CPU tensors, but it makes "the step reads nothing back" impossible to check on
a CPU, where a CPU tensor read and a device synchronisation look the same (tests/test_host_sync.py). Here
every draw is a Python number from `random.Random`, seeded from the batch's place in the run: the global
random state is not touched, and a resumed epoch mixes what the uninterrupted one mixed.

A fraction ``mix_prob`` of batches is mixed; the others go through untouched, with integer targets. The
losses (`skinlesion.losses`) take either integer or probability targets, with label smoothing applied to
both. Training accuracy is not reported anywhere, so there is none to be wrong on mixed batches.
"""

from __future__ import annotations

import math
import random

import torch

from skinlesion.config import TrainConfig
from skinlesion.data.augment import batch_seed
from skinlesion.labels import CLASSES


class Mixer:
    """Mixes a share of device batches; `None` from `make_mixer` when mixing is off."""

    def __init__(self, cfg: TrainConfig, num_classes: int = len(CLASSES)) -> None:
        pairs = (("mixup", cfg.mixup_alpha), ("cutmix", cfg.cutmix_alpha))
        self.kinds = [(kind, alpha) for kind, alpha in pairs if alpha > 0]
        self.prob, self.seed, self.num_classes = cfg.mix_prob, cfg.seed, num_classes

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int, rank: int, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [B, 3, H, W], labels [B]) -> (images, labels) untouched, or mixed images with targets
        [B, classes] that sum to 1."""
        rng = random.Random(batch_seed(self.seed, epoch, rank, batch, "/mix"))
        if rng.random() >= self.prob:
            return images, labels
        kind, alpha = rng.choice(self.kinds)
        lam = rng.betavariate(alpha, alpha)
        other = images.roll(1, 0)
        if kind == "mixup":
            mixed = other.mul(1.0 - lam).add_(images.mul(lam))
        else:  # paste a box of the neighbour's pixels whose area is about 1 - lam, then use the exact share
            height, width = images.shape[-2:]
            cy, cx = rng.randrange(height), rng.randrange(width)
            half_h, half_w = int(0.5 * math.sqrt(1.0 - lam) * height), int(0.5 * math.sqrt(1.0 - lam) * width)
            y0, y1 = max(cy - half_h, 0), min(cy + half_h, height)
            x0, x1 = max(cx - half_w, 0), min(cx + half_w, width)
            mixed = images.clone()
            mixed[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        # One-hot by scatter: `one_hot` checks the label range with a read-back on the CPU.
        one_hot = torch.zeros(labels.shape[0], self.num_classes, device=labels.device).scatter_(1, labels[:, None], 1.0)
        return mixed, one_hot.mul(lam).add_(one_hot.roll(1, 0).mul(1.0 - lam))


def make_mixer(cfg: TrainConfig, num_classes: int = len(CLASSES)) -> Mixer | None:
    return Mixer(cfg, num_classes) if cfg.mix_prob > 0 else None
