"""Fine-tuning: train.backbone_lr_mult gives the backbone its share of the learning rate, and
train.freeze_backbone_epochs trains only the head first, with BatchNorm statistics frozen, from a local
"pretrained" state_dict file (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import STEPS_PER_EPOCH, run_train, tiny_shards
from safetensors.torch import load_file
from torchvision.models import resnet18

from skinlesion.config import load_config
from skinlesion.errors import UserError
from skinlesion.optim import make_optimizer


def test_the_head_and_the_backbone_are_separate_groups() -> None:
    cfg = load_config(None, ["train.weight_decay=0.05"]).train
    model = resnet18(num_classes=7)
    groups = make_optimizer(model, cfg).param_groups
    head = {id(p) for p in model.fc.parameters()}
    for group in groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1 and group["backbone"] == (not in_head.pop())
        assert group["weight_decay"] == (0.05 if group["params"][0].ndim > 1 else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_freezing_every_epoch_is_refused() -> None:
    with pytest.raises(UserError, match="freeze_backbone_epochs"):
        load_config(None, ["train.epochs=2", "train.freeze_backbone_epochs=2"])


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in load_file(checkpoint / "model.safetensors").items()}


@pytest.mark.slow
def test_a_frozen_backbone_keeps_its_pretrained_weights_and_statistics_then_learns(tmp_path: Path) -> None:
    torch.manual_seed(1)
    imagenet_like = resnet18()  # 1000 classes: its fc is dropped, as with ImageNet weights
    for module in imagenet_like.modules():  # non-trivial statistics, so "unchanged" means something
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    pretrained = tmp_path / "pretrained.pth"
    torch.save(imagenet_like.state_dict(), pretrained)
    original = imagenet_like.state_dict()

    shards, out = tiny_shards(tmp_path / "shards"), tmp_path / "run"
    done = run_train(out, shards, f"model.pretrained={pretrained}", "train.freeze_backbone_epochs=1",
                     "train.backbone_lr_mult=0.1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]

    frozen = _weights(out / "checkpoints" / f"step-{STEPS_PER_EPOCH:08d}")  # after epoch 0, the frozen one
    backbone = [k for k in original if not k.startswith("fc.")]
    assert all(torch.equal(frozen[k], original[k]) for k in backbone), "the frozen backbone moved"
    final = torch.load(out / "model.pt", weights_only=True)
    assert not torch.equal(final["fc.weight"], frozen["fc.weight"])
    learned = [k for k in backbone if k.endswith((".weight", "running_mean"))]
    assert all(not torch.equal(final[k], original[k]) for k in learned), "the backbone did not learn after unfreezing"

    optimizer = torch.load(out / "checkpoints" / f"step-{2 * STEPS_PER_EPOCH:08d}" / "optimizer.bin",
                           weights_only=True)  # fmt: skip
    lrs = {group["backbone"]: group["lr"] for group in optimizer["param_groups"]}
    assert lrs[True] == pytest.approx(0.1 * lrs[False])
