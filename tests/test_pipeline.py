"""The shard pipeline: equal batches per rank whatever the shard count, exact eval reading, safe decoding.

`helpers.write_shards` (also used by the training tests) writes tiny shards in the manifest format of
`skinlesion prepare`, with a colour per class so that a small CNN learns them in a few steps.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from helpers import write_shards
from PIL import Image

from skinlesion.data.manifest import read_manifest
from skinlesion.data.pipeline import batches_per_rank, eval_loader, train_loader
from skinlesion.data.transforms import eval_crop, train_crop, train_transform
from skinlesion.data.workers import resolve_workers
from skinlesion.errors import UserError
from skinlesion.labels import CLASSES


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("uneven"), {"train": [20, 9, 13], "val": [7, 5, 4]})


def _train_batches(shards: Path, rank: int, world: int, workers: int, epoch: int = 0, skip: int = 0, bs: int = 4):
    batches = batches_per_rank(42, bs, world)
    loader = train_loader(
        shards,
        image_size=32,
        batch_size=bs,
        num_workers=workers,
        rank=rank,
        world_size=world,
        seed=0,
        epoch=epoch,
        batches=batches,
        skip_batches=skip,
        shuffle_buffer=8,
    )
    return list(loader)


def test_every_rank_gets_the_same_number_of_batches_with_uneven_shards(uneven: Path) -> None:
    # 3 shards of unequal size for 2 ranks x 2 workers: a naive split would give ranks different step counts.
    with pytest.warns(UserWarning, match=r"3 train shards for 2 ranks x 2 workers: some samples repeat"):
        per_rank = [_train_batches(uneven, rank, 2, workers=2) for rank in range(2)]
    assert [len(b) for b in per_rank] == [5, 5]  # 42 samples // 2 ranks // 4
    assert all(b["image"].shape == (4, 3, 32, 32) and b["label"].dtype == torch.long for b in per_rank[0])


def test_training_order_is_reproducible_per_epoch_and_differs_between_epochs(uneven: Path) -> None:
    keys = lambda batches: [k for b in batches for k in b["key"]]  # noqa: E731
    first, again = _train_batches(uneven, 0, 1, workers=0), _train_batches(uneven, 0, 1, workers=0)
    assert keys(first) == keys(again)
    assert torch.equal(first[0]["image"], again[0]["image"])  # augmentation too
    assert keys(_train_batches(uneven, 0, 1, workers=0, epoch=1)) != keys(first)


def test_one_epoch_on_one_rank_reads_each_sample_once(uneven: Path) -> None:
    seen = [k for b in _train_batches(uneven, 0, 1, workers=0, bs=2) for k in b["key"]]
    assert len(seen) == len(set(seen)) == 42


def test_resume_skips_the_batches_already_seen(uneven: Path) -> None:
    full = [k for b in _train_batches(uneven, 0, 1, workers=2, bs=2) for k in b["key"]]
    rest = [k for b in _train_batches(uneven, 0, 1, workers=2, bs=2, skip=8) for k in b["key"]]
    assert len(rest) == len(full) - 16
    assert Counter(rest) == Counter(full) - Counter(full[:16])  # exactly the unseen remainder


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2), (3, 1)])
def test_eval_loader_yields_every_sample_exactly_once_across_ranks(uneven: Path, world: int, workers: int) -> None:
    keys, labels, metas = [], [], []
    for rank in range(world):
        for batch in eval_loader(uneven, "val", 32, 3, workers, rank, world):
            keys += batch["key"]
            labels += batch["label"].tolist()
            metas += batch["meta"]
            assert len(batch["meta"]) == len(batch["key"])
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 16
    assert labels == [CLASSES.index(m["dx"]) for m in metas]  # each label is its own sample's diagnosis


def test_pickle_members_are_never_decoded(tmp_path: Path) -> None:
    out = write_shards(tmp_path, {"train": [4], "val": [2]})
    with wds.TarWriter(str(out / "val-000000.tar")) as sink:  # replace val with samples carrying a pickle
        for i in range(2):
            sink.write({"__key__": f"k{i}", "jpg": _jpeg(), "cls": b"1", "pyd": pickle.dumps(object())})
    batch = next(iter(eval_loader(out, "val", 32, 2, 0, 0, 1)))
    assert set(batch) == {"image", "label", "key", "meta"} and batch["label"].tolist() == [1, 1]


def test_missing_shards_folder_or_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data.shards=.*does not exist.*skinlesion prepare"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(UserError, match=r"manifest\.json is missing"):
        read_manifest(tmp_path)


def test_presets_give_tensors_of_the_requested_size_and_type() -> None:
    img = Image.new("RGB", (60, 45), (128, 64, 32))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    out = train_transform(32)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    tile, affine = train_crop(32)(buf.getvalue())
    assert tile.shape == (3, 32, 32) and tile.dtype == torch.uint8 and affine.shape == (2, 3)
    evaluated = eval_crop(32)(buf.getvalue())
    assert evaluated.shape == (3, 32, 32) and evaluated.dtype == torch.uint8
    assert torch.equal(evaluated, eval_crop(32)(buf.getvalue()))


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _corrupt_first_jpeg(shard: Path) -> str:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = b"\xff\xd8 not a jpeg any more" if member.name == victim else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return victim.split(".")[0]


@pytest.mark.parametrize("augment", ["device", "cpu"])
def test_a_corrupt_training_sample_is_skipped_counted_and_replaced(tmp_path: Path, augment: str, caplog) -> None:
    out = write_shards(tmp_path, {"train": [16], "val": [4]})
    key = _corrupt_first_jpeg(out / "train-000000.tar")
    loader = train_loader(
        out,
        image_size=16,
        batch_size=5,
        num_workers=0,
        rank=0,
        world_size=1,
        seed=0,
        epoch=0,
        batches=3,
        augment=augment,
    )
    with caplog.at_level("WARNING"):
        batches = list(loader)
    assert [len(b["label"]) for b in batches] == [5, 5, 5]  # the epoch keeps its length: ranks stay in step
    assert sum(b["skipped"] for b in batches) == 1 and key not in [k for b in batches for k in b["key"]]
    assert f"skipping sample {key!r}" in caplog.text


def test_a_corrupt_evaluation_sample_stops_evaluation_naming_it(tmp_path: Path) -> None:
    out = write_shards(tmp_path, {"train": [4], "val": [6]})
    key = _corrupt_first_jpeg(out / "val-000000.tar")
    with pytest.raises(UserError, match=rf"sample '{key}' in .*val-000000.tar: its image does not decode"):
        list(eval_loader(out, "val", 16, 4, 0, 0, 1))


def test_shards_that_are_mostly_corrupt_stop_training_instead_of_spinning(tmp_path: Path) -> None:
    out = write_shards(tmp_path, {"train": [120], "val": [4]})
    shard = out / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = b"\xff\xd8 broken" if member.name.endswith(".jpg") else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    loader = train_loader(
        out, image_size=16, batch_size=4, num_workers=0, rank=0, world_size=1, seed=0, epoch=0, batches=3
    )
    with pytest.raises(UserError, match=r"100 of 100 samples do not decode .*rerun `skinlesion prepare`"):
        list(loader)


# data.num_workers: the cores this process may use (affinity mask, SLURM's allocation), never the machine's.
# env={} keeps a test run inside a SLURM job from reading that job's variables.


def cores(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)


def test_auto_workers_under_a_one_cpu_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU run on one core still gets a worker (decoding in the training process stalls the GPU), and a
    one-line warning naming the cores and the fix; on CPU 0 is right, and the log says why."""
    cores(monkeypatch, 1)
    gpu = resolve_workers("auto", gpu=True, env={})
    assert gpu.count == 1
    assert gpu.note.startswith("warning: data.num_workers=auto: 1 core(s)") and "affinity mask 1" in gpu.note
    assert "1 loader worker(s) per GPU" in gpu.note and "--cpus-per-task" in gpu.note and "\n" not in gpu.note
    cpu = resolve_workers("auto", gpu=False, env={})
    assert cpu.count == 0 and "0 loader workers" in cpu.note and "on CPU" in cpu.note


def test_auto_workers_follow_slurm_cpus_per_task(monkeypatch: pytest.MonkeyPatch) -> None:
    cores(monkeypatch, 128)  # a cluster that does not bind CPUs: the mask shows the whole node
    granted = resolve_workers("auto", gpu=True, env={"SLURM_CPUS_PER_TASK": "64", "LOCAL_WORLD_SIZE": "8"})
    assert granted.count == 7 and "SLURM_CPUS_PER_TASK=64" in granted.note and "warning" not in granted.note
    default = resolve_workers("auto", gpu=True, env={"SLURM_CPUS_PER_TASK": "1", "LOCAL_WORLD_SIZE": "8"})
    assert default.count == 1 and default.note.startswith("warning:") and "SLURM_CPUS_PER_TASK=1" in default.note
    no_flag = resolve_workers("auto", gpu=True, env={"SLURM_CPUS_ON_NODE": "16"})  # sbatch without -c: the node's share
    assert no_flag.count == 15 and "SLURM_CPUS_ON_NODE=16" in no_flag.note
    cores(monkeypatch, 4)  # a cluster that binds: a mask narrower than the allocation wins
    assert resolve_workers("auto", gpu=True, env={"SLURM_CPUS_PER_TASK": "16"}).count == 3


def test_more_workers_than_cores_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    cores(monkeypatch, 2)
    with pytest.raises(UserError) as refused:
        resolve_workers(1000, gpu=False, env={})
    message = str(refused.value)
    assert message.startswith("data.num_workers=1000 is more than the 2 core(s)") and "\n" not in message
    assert "affinity mask 2" in message and "data.num_workers=auto" in message
    assert resolve_workers(2, gpu=True, env={}) == resolve_workers(2, gpu=False, env={})
    assert resolve_workers(2, gpu=True, env={}).count == 2
    with pytest.raises(UserError, match="SLURM_CPUS_PER_TASK=1"):
        resolve_workers(2, gpu=True, env={"SLURM_CPUS_PER_TASK": "1"})


@pytest.mark.skipif(shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"), reason="no taskset")
def test_auto_workers_in_a_process_that_taskset_pins_to_one_core() -> None:
    code = "from skinlesion.data.workers import resolve_workers as r; print(r('auto', True, {}).count, "
    code += "r('auto', False, {}).count)"
    core = str(min(os.sched_getaffinity(0)))  # one of the cores this test may use
    pinned = ["taskset", "-c", core, sys.executable, "-c", code]
    done = subprocess.run(pinned, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0"]
