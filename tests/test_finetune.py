"""Fine-tuning: model.pretrained takes a torchvision state_dict or skinlesion's own exports, and says in one
line why any other file does not fit; train.backbone_lr_mult gives the backbone its share of the learning rate, and
train.freeze_backbone_epochs trains only the head first, with BatchNorm statistics frozen, from a local
"pretrained" state_dict file (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import STEPS_PER_EPOCH, run_train, tiny_shards
from safetensors.torch import load_file
from torchvision.models import resnet18, resnet34, resnet50

from skinlesion.checkpoint import export_best, export_model
from skinlesion.config import load_config
from skinlesion.errors import UserError
from skinlesion.facts import ModelFacts
from skinlesion.labels import CLASSES
from skinlesion.model import build_model
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
    done = run_train(
        out, shards, f"model.pretrained={pretrained}", "train.freeze_backbone_epochs=1", "train.backbone_lr_mult=0.1"
    )
    assert done.returncode == 0, done.stderr[-2000:]

    frozen = _weights(out / "checkpoints" / f"step-{STEPS_PER_EPOCH:08d}")  # after epoch 0, the frozen one
    backbone = [k for k in original if not k.startswith("fc.")]
    assert all(torch.equal(frozen[k], original[k]) for k in backbone), "the frozen backbone moved"
    final = torch.load(out / "model.pt", weights_only=True)
    assert not torch.equal(final["fc.weight"], frozen["fc.weight"])
    learned = [k for k in backbone if k.endswith((".weight", "running_mean"))]
    assert all(not torch.equal(final[k], original[k]) for k in learned), "the backbone did not learn after unfreezing"

    optimizer = torch.load(out / "checkpoints" / f"step-{2 * STEPS_PER_EPOCH:08d}" / "optimizer.bin", weights_only=True)
    lrs = {group["backbone"]: group["lr"] for group in optimizer["param_groups"]}
    assert lrs[True] == pytest.approx(0.1 * lrs[False])


def _one_line_error(pretrained: Path, arch: str = "resnet18") -> str:
    with pytest.raises(UserError) as caught:
        build_model(arch, str(pretrained))
    message = str(caught.value)
    assert "\n" not in message and str(pretrained) in message
    return message


def test_weights_of_another_architecture_are_one_line_naming_it(tmp_path: Path) -> None:
    # Before: torch's RuntimeError, one "size mismatch" line per tensor (23 of them for a resnet50).
    path = tmp_path / "r50.pth"
    torch.save(resnet50().state_dict(), path)
    message = _one_line_error(path)
    assert "holds resnet50 weights, and model.name is resnet18: set model.name=resnet50" in message


def test_a_one_channel_conv1_is_one_line_naming_the_tensor_and_the_channels(tmp_path: Path) -> None:
    model = resnet18()
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    path = tmp_path / "grey.pth"
    torch.save(model.state_dict(), path)
    message = _one_line_error(path)
    assert "conv1.weight [64, 1, 7, 7] (not [64, 3, 7, 7]); it looks like a resnet18 for 1-channel images" in message


def test_skinlesion_best_pt_and_model_pt_initialise_the_whole_model(tmp_path: Path) -> None:
    # Before: best.pt was refused as "does not fit resnet18: ... unexpected ['model', 'arch', 'classes']".
    torch.manual_seed(0)
    trained = resnet18(num_classes=7).state_dict()
    facts = ModelFacts(arch="resnet18", classes=CLASSES, image_size=32)
    export_best(trained, tmp_path / "best.pt", facts=facts, epoch=3, step=40, metric={"name": "m", "value": 0.5})
    export_model(trained, tmp_path / "model.pt", facts)
    for name in ("best.pt", "model.pt"):
        loaded = build_model("resnet18", str(tmp_path / name)).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in trained.items()), name  # the head too: same classes


def test_a_best_pt_of_another_architecture_says_what_it_is(tmp_path: Path) -> None:
    facts = ModelFacts(arch="resnet34", classes=CLASSES, image_size=32)
    path = tmp_path / "best.pt"
    export_best(
        resnet34(num_classes=7).state_dict(), path, facts=facts, epoch=0, step=1, metric={"name": "m", "value": None}
    )
    message = _one_line_error(path)
    assert "is a skinlesion best.pt of arch='resnet34', and model.name is resnet18: set model.name=resnet34" in message


def test_a_training_checkpoint_bundle_says_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": resnet18().state_dict(), "epoch": 3}, path)
    message = _one_line_error(path)
    assert "is a training checkpoint with entries ['epoch', 'state_dict'], not a state_dict" in message
    assert "torch.save(ckpt['state_dict'], 'weights.pt')" in message
