"""MixUp/CutMix (skinlesion.mixing) and the losses' probability targets: mixed targets are distributions,
off leaves the batch untouched, draws are reproducible and leave the global random state alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf
from helpers import metrics, run_train, tiny_shards

from skinlesion.config import load_config
from skinlesion.errors import UserError
from skinlesion.losses import make_criterion
from skinlesion.mixing import make_mixer

MANIFEST = {"splits": {"train": {"class_counts": dict.fromkeys(("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"), 5)}}}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 16, 16, generator=g), torch.arange(8) % 7


def _mixer(*overrides: str):
    return make_mixer(load_config(None, list(overrides)).train)


@pytest.mark.parametrize("kind", ["train.mixup_alpha=0.4", "train.cutmix_alpha=1.0"])
def test_mixed_targets_are_distributions_over_at_most_two_classes(kind: str) -> None:
    mixer = _mixer("train.mix_prob=1", kind)
    x, y = _batch()
    changed = 0
    for batch in range(10):
        out, target = mixer(x, y, 0, 0, batch)
        assert target.shape == (8, 7) and target.dtype.is_floating_point
        assert torch.allclose(target.sum(dim=1), torch.ones(8))
        assert (target >= 0).all() and ((target > 0).sum(dim=1) <= 2).all()
        # sample i is mixed with sample i - 1 (torchvision rolls the batch by one), by the weight its target
        # gives its own class: for MixUp, the pixels' blend; for CutMix, the share of pixels kept
        for i in range(1, 8):
            lam = target[i, y[i]]
            if kind.startswith("train.mixup"):
                assert torch.allclose(out[i], lam * x[i] + (1 - lam) * x[i - 1], atol=1e-5)
            else:
                assert (out[i] == x[i]).float().mean() == pytest.approx(lam.item(), abs=1e-6)
        changed += not torch.equal(out, x)
    assert changed >= 5


def test_mixing_off_leaves_batches_bit_identical() -> None:
    assert _mixer() is None  # the default: the trainer never calls a mixer
    mixer = _mixer("train.mix_prob=0.5", "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0")
    x, y = _batch()
    untouched = 0
    for batch in range(40):
        out, target = mixer(x, y, 0, 0, batch)
        if target.dtype == torch.long:
            assert out is x and target is y
            untouched += 1
    assert 5 <= untouched <= 35  # about half; the draws are seeded, so this is the same on every machine


def test_draws_are_a_function_of_the_batch_and_leave_the_global_generator_alone() -> None:
    mixer = _mixer("train.mix_prob=1", "train.mixup_alpha=0.4")
    x, y = _batch()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = mixer(x, y, 2, 1, 5)
    assert torch.equal(torch.get_rng_state(), state)
    b = mixer(x, y, 2, 1, 5)
    c = mixer(x, y, 2, 1, 6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("loss", ["ce", "weighted_ce", "logit_adjusted", "focal"])
def test_every_loss_takes_probability_targets_with_label_smoothing(loss: str) -> None:
    """A one-hot probability target gives the integer target's loss; a 50/50 target gives the average."""
    criterion = make_criterion(load_config(None, [f"train.loss={loss}", "train.label_smoothing=0.1"]).train, MANIFEST)
    logits = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    y, other = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([6, 0, 1, 2, 3, 4])
    one_hot = nnf.one_hot(y, 7).float()
    assert torch.allclose(criterion(logits, one_hot), criterion(logits, y), atol=1e-6)
    if loss != "weighted_ce":  # a weighted mean over samples is not linear in the target's mix
        half = (one_hot + nnf.one_hot(other, 7).float()) / 2
        assert torch.allclose(criterion(logits, half), (criterion(logits, y) + criterion(logits, other)) / 2, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.mix_prob=0.5"], "mixes nothing"),
        (["train.mix_prob=1.5", "train.mixup_alpha=0.2"], "from 0 to 1"),
        (["train.cutmix_alpha=-1"], ">= 0"),
    ],
)
def test_bad_mixing_settings_are_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


@pytest.mark.slow
def test_training_with_mixup_and_cutmix_runs_and_the_loss_falls(tmp_path) -> None:
    shards = tiny_shards(tmp_path / "shards")
    out = tmp_path / "run"
    done = run_train(
        out, shards, "train.epochs=3", "train.mix_prob=0.5", "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = metrics(out)
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
