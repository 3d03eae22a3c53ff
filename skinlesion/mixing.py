"""MixUp and CutMix on the training device: ``train.mixup_alpha``, ``train.cutmix_alpha``, ``train.mix_prob``.

The references people compare against (torchvision's classification recipes, timm) train with one of the
two per batch. This is torchvision's own `v2.MixUp` / `v2.CutMix` inside `v2.RandomChoice`, applied to the
augmented, normalised batch on the device, after the loader: the loader's samples stay independent, and
a mixed pair can come from any two shards. Each draws one mixing weight per batch and pairs every sample
with its neighbour (``roll(1)``); targets become class probabilities that sum to 1.

A fraction ``mix_prob`` of batches is mixed; the others go through untouched, with integer targets. The
draws use torch's global CPU generator (that is what the v2 transforms use), so they run under
`torch.random.fork_rng` with a seed that is a function of the batch's place in the run: the rest of the
program's random state is not disturbed, and a resumed epoch mixes what the uninterrupted one mixed.

The losses (`skinlesion.losses`) take either integer or probability targets, with label smoothing applied
to both. Training accuracy is not reported anywhere, so there is none to be wrong on mixed batches.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from skinlesion.config import TrainConfig
from skinlesion.data.augment import batch_seed
from skinlesion.labels import CLASSES


class Mixer:
    """Mixes a share of device batches; `None` from `make_mixer` when mixing is off."""

    def __init__(self, cfg: TrainConfig, num_classes: int = len(CLASSES)) -> None:
        choices: list[v2.Transform] = []
        if cfg.mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
        if cfg.cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
        self.transform = v2.RandomChoice(choices)
        self.prob, self.seed = cfg.mix_prob, cfg.seed

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int, rank: int, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [B, 3, S, S], labels [B]) -> (images, labels) untouched, or mixed images with targets
        [B, classes] that sum to 1."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed(self.seed, epoch, rank, batch, "/mix"))
            if torch.rand(()).item() >= self.prob:
                return images, labels
            return self.transform(images, labels)


def make_mixer(cfg: TrainConfig) -> Mixer | None:
    return Mixer(cfg) if cfg.mix_prob > 0 else None
