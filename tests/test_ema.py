"""The EMA of the weights: its closed form on a toy model, and training and resume with it on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import STEPS_PER_EPOCH, metrics, run_train, tiny_shards
from torch import nn

from skinlesion.ema import make_ema


def test_ema_matches_its_closed_form_on_a_toy_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    decay, values = 0.9, []
    ema = make_ema(model, decay)
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.full_like(p, float(step + 1)))
            model[1].running_mean.fill_(10.0 * (step + 1))  # buffers are averaged too (use_buffers=True)
        ema.update_parameters(model)
        values.append(step + 1)
    # The first update copies the weights; each later one is ema = decay * ema + (1 - decay) * w.
    expected = float(values[0])
    for v in values[1:]:
        expected = decay * expected + (1 - decay) * v
    weight = ema.module[0].weight
    assert torch.allclose(weight, torch.full_like(weight, expected))
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), 10.0 * expected))
    assert make_ema(model, 0.0) is None


@pytest.mark.slow
def test_training_with_ema_records_both_and_resume_reproduces_it(tmp_path: Path) -> None:

    shards = tiny_shards(tmp_path / "shards")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = run_train(whole, shards, "train.ema_decay=0.9")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = metrics(whole)
    assert all("val_balanced_accuracy_raw" in m for m in lines)
    (resumed / "checkpoints").mkdir(parents=True)
    first = whole / "checkpoints" / f"step-{STEPS_PER_EPOCH:08d}"
    shutil.copytree(first, resumed / "checkpoints" / first.name)
    done = run_train(resumed, shards, "train.ema_decay=0.9")
    assert done.returncode == 0, done.stderr[-2000:]
    a = torch.load(whole / "model.pt", weights_only=True)  # the EMA weights
    b = torch.load(resumed / "model.pt", weights_only=True)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5
    # model.pt holds the average, not the last raw weights (which the newest checkpoint holds).
    from safetensors.torch import load_file

    newest = sorted((whole / "checkpoints").glob("step-*"))[-1]
    raw = {k.removeprefix("module."): v for k, v in load_file(newest / "model.safetensors").items()}
    assert max((a[k].float() - raw[k].float()).abs().max().item() for k in a if k.endswith("weight")) > 1e-4


@pytest.mark.slow
def test_an_ema_file_that_would_run_code_is_refused_on_resume(tmp_path: Path) -> None:

    shards = tiny_shards(tmp_path / "shards")
    out = tmp_path / "run"
    assert run_train(out, shards, "train.ema_decay=0.9", "train.epochs=1").returncode == 0
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for folder in (out / "checkpoints").glob("step-*"):
        torch.save({"n_averaged": Exploit()}, folder / "ema.pt")
    (out / "model.pt").unlink()
    done = run_train(out, shards, "train.ema_decay=0.9", "train.epochs=2")
    assert done.returncode == 2 and "cannot resume from" in done.stderr
    assert not marker.exists()
