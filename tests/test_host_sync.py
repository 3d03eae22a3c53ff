"""Issue 15: the training loop runs at the speed of its step. On a GPU every value read back from the device
(`.item()`, `bool(tensor)`, `.tolist()`) or made from host data (`torch.tensor(list, device=...)`) stops the
CPU until the GPU has caught up, so it cannot queue the next step. On a CPU they look the same, so they are
counted here: a TorchDispatchMode on `aten._local_scalar_dense` and `aten.lift_fresh`, plus `Tensor.tolist`,
active only while the trainer runs an epoch's steps (loader workers are other processes)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from helpers import TINY, metrics, run_train, tiny_shards
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

import skinlesion.train as train_module
from skinlesion.config import load_config
from skinlesion.data.pipeline import train_loader
from skinlesion.data.transforms import normalize

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default}
# The shipped recipe's moving parts: EMA, MixUp/CutMix, a frozen first epoch, gradient clipping, AdamW.
RECIPE = [
    "train.ema_decay=0.9",
    "train.mix_prob=0.5",
    "train.mixup_alpha=0.2",
    "train.cutmix_alpha=1.0",
    "train.freeze_backbone_epochs=1",
    "train.grad_clip=1.0",
    "data.num_workers=1",
]


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func in READS
        return func(*args, **(kwargs or {}))


def _reads_per_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> list[tuple[int, int]]:
    """(optimizer steps, host reads) of each epoch of an in-process training."""
    shards = tiny_shards(tmp_path / "shards")
    cfg = load_config(
        REPO_SMOKE, [f"data.shards={shards}", f"train.output_dir={tmp_path / 'run'}", *TINY, *RECIPE, *overrides]
    )
    counted: list[tuple[int, int]] = []
    real_epoch, real_tolist = train_module.train_epoch, torch.Tensor.tolist

    def epoch(run, state, batches):
        counter, step = _Count(), state.step

        def tolist(self):
            counter.reads += 1
            return real_tolist(self)

        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        with counter:
            stats = real_epoch(run, state, batches)
        monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
        counted.append((state.step - step, counter.reads))
        return stats

    monkeypatch.setattr(train_module, "train_epoch", epoch)
    normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))  # its constants are made once per process, not counted
    train_module.train(cfg)
    return counted


REPO_SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


@pytest.mark.slow
def test_the_loop_reads_back_once_per_check_and_starts_its_workers_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three epochs of 7 steps with checks every 3 steps: each epoch reads back at its checks (steps 3, 6 and its
    last, 7; then 9, 12, 14; then 15, 18, 21) and twice at its end (the epoch's loss sum): 5, whatever the number
    of steps. Before, every step read 3 times (the loss check and the ranks' agreement), the EMA 2 more and the
    mixing several. The same run starts the train loader's workers once and the validation loader's once (both
    started again every epoch before: seconds of an idle GPU between epochs with many workers), and leaves no
    signal handler behind."""
    started = []
    real_init = _MultiProcessingDataLoaderIter.__init__

    def counting_init(self, loader):
        started.append(type(loader.dataset).__name__)
        real_init(self, loader)

    monkeypatch.setattr(_MultiProcessingDataLoaderIter, "__init__", counting_init)
    before = signal.getsignal(signal.SIGTERM)
    epochs = _reads_per_epoch(tmp_path, monkeypatch, "train.log_every_steps=3", "train.epochs=3")
    assert epochs == [(7, 5), (7, 5), (7, 5)], epochs
    assert started.count("TrainStream") == 1 and started.count("EvalStream") == 2  # val once, test at the end
    # Issue 16: the trainer's flag-only SIGTERM handler is gone once train() returns; a later process pool in
    # this process (synth, prepare) would otherwise wait forever for workers that ignore SIGTERM.
    assert signal.getsignal(signal.SIGTERM) is before


def test_one_loader_serves_every_epoch_and_matches_per_epoch_loaders(tmp_path: Path) -> None:
    """The run's single loader (workers that live for the run) yields, epoch by epoch and batch by batch, what a
    fresh loader per epoch yields, also when it starts mid-epoch (a resume) with batches that do not divide
    among the workers: batch i of an epoch always comes from the same logical worker."""
    shards = tiny_shards(tmp_path / "shards")
    common = dict(
        image_size=32,
        batch_size=4,
        num_workers=2,
        rank=0,
        world_size=1,
        seed=3,
        batches=5,
        shuffle_buffer=8,
        augment="device",
    )

    def keys(loader) -> list[list[str]]:
        return [batch["key"] for batch in loader]

    per_epoch = [keys(train_loader(shards, epoch=e, **common)) for e in range(3)]
    assert keys(train_loader(shards, epoch=0, epochs=3, **common)) == [b for e in per_epoch for b in e]
    resumed = keys(train_loader(shards, epoch=1, epochs=2, skip_batches=3, **common))
    assert resumed == per_epoch[1][3:] + per_epoch[2]


@pytest.mark.slow
def test_compile_does_not_recompile_at_unfreeze_or_validation(tmp_path: Path) -> None:
    """The shipped recipe with train.compile=true: a frozen epoch (eager), then two unfrozen ones. One compiled
    graph in all (aot_eager: Dynamo and AOTAutograd as on a GPU, without Inductor's C++ build), and neither
    validation, MixUp/CutMix batches nor the second epoch compile again."""
    shards = tiny_shards(tmp_path / "shards")
    out = tmp_path / "run"
    done = run_train(
        out, shards, *RECIPE, "train.epochs=3", "train.compile=true", "train.compile_backend=aot_eager", timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = metrics(out)
    assert "compile_seconds" not in lines[0]  # the frozen epoch runs eager
    assert lines[1]["compile_seconds"] > 0
    assert [m["compiled_graphs"] for m in lines[1:]] == [1, 1]
    assert (out / "model_card.json").is_file() and (out / "model.pt").is_file()
