"""Shards -> decoded, augmented batches: the training stream and the exact evaluation reader.

Training (`train_loader`): every (rank, loader worker) pair is a *slot*. Each epoch the shard list is
shuffled from (seed, epoch), identically on every rank, and dealt out to the slots; each slot shuffles
its samples through a buffer seeded from (seed, epoch, slot). Ranks must run the same number of steps
or DDP hangs in an all-reduce, and shards rarely divide evenly, so the epoch length is not "until the
shards run out": it is fixed up front from the manifest (``samples // world_size // batch_size``
batches per rank), and each slot cycles over its shards until it has delivered its share. With at least
ranks x workers shards of similar size (what `prepare --min-shards` ensures) that is one pass over the
data; with fewer, some samples repeat within the epoch (a warning says so) but nothing hangs.

Evaluation (`eval_loader`): shards are dealt to slots without shuffling or cycling, so every sample of
the split is read exactly once across all ranks together; a rank may get fewer batches, or none.

Only the ``jpg``, ``cls`` and ``json`` members of a sample are decoded (PIL, int, json): nothing in a
shard is ever unpickled. Loaders are plain DataLoaders that must NOT go through accelerator.prepare
(it would re-split the already split stream); callers move batches to the device themselves.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import re
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from skinlesion.data.transforms import Transform, eval_transform, train_transform
from skinlesion.errors import UserError
from skinlesion.labels import CLASSES

Batch = dict[str, Any]


def read_manifest(shards: Path) -> dict[str, Any]:
    """The manifest of a prepared dataset, checked key by key; a one-line error for anything amiss.

    A manifest is data, not instructions: its file names must be bare names of ``.tar`` files inside
    the folder (no separator, no ``..``, no URL scheme or ``pipe:``), and are only ever opened as local files.
    """
    shards = Path(shards)
    if not shards.is_dir():
        raise UserError(
            f"data.shards={shards} does not exist; create it with `skinlesion prepare --out {shards} ...` "
            f"or point data.shards at a prepared folder"
        )
    path = shards / "manifest.json"
    if not path.is_file():
        raise UserError(
            f"{path} is missing: {shards} is not a complete dataset (prepare writes manifest.json last); "
            f"rerun `skinlesion prepare --out {shards} --overwrite ...`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc}); rerun `skinlesion prepare`") from exc
    _check_manifest(manifest, path)
    return manifest


_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.tar$")


def _check_manifest(manifest: Any, path: Path) -> None:
    def bad(key: str, what: str) -> UserError:
        return UserError(f"{path}: {key} {what}; the manifest is damaged or not from skinlesion prepare (rerun it)")

    if not isinstance(manifest, dict):
        raise bad("the top level", "is not an object")
    if list(manifest.get("classes") or []) != list(CLASSES):
        raise bad("'classes'", f"is {manifest.get('classes')!r}, not {list(CLASSES)}")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not set(splits) <= {"train", "val", "test"}:
        raise bad("'splits'", "must be an object with train, val and/or test")
    for split, info in splits.items():
        key = f"splits.{split}"
        if not isinstance(info, dict):
            raise bad(key, "is not an object")
        samples, files, sizes = info.get("samples"), info.get("files"), info.get("shard_samples")
        if not _count(samples):
            raise bad(f"{key}.samples", f"is {samples!r}, not a count")
        if not isinstance(files, list) or not all(isinstance(f, str) and _SHARD_NAME.match(f) for f in files):
            odd = next((f for f in files if not (isinstance(f, str) and _SHARD_NAME.match(f))), files) \
                if isinstance(files, list) else files  # fmt: skip
            raise bad(f"{key}.files", f"holds {odd!r}: entries must be bare .tar file names inside {path.parent}")
        if not isinstance(sizes, list) or len(sizes) != len(files) or not all(map(_count, sizes)):
            raise bad(f"{key}.shard_samples", "must list one sample count per file")
        if sum(sizes) != samples:
            raise bad(f"{key}.shard_samples", f"adds up to {sum(sizes)}, but samples is {samples}")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def split_shards(shards: Path, manifest: dict[str, Any], split: str) -> list[tuple[Path, int]]:
    """(shard path, samples in it) for each file of `split`, in manifest order."""
    info = manifest["splits"].get(split)
    if info is None:
        raise UserError(f"{shards}/manifest.json has no {split!r} split")
    files = [Path(shards) / name for name in info["files"]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"shard files listed in {shards}/manifest.json are missing: {missing[:3]}; rerun prepare")
    return list(zip(files, info["shard_samples"], strict=True))


def verify_split(shards: Path, manifest: dict[str, Any], split: str) -> None:
    """Check every shard of `split` against the manifest before an epoch is spent on it.

    A header scan (about 0.06 ms a sample): each file must be a readable tar whose samples each have a
    ``jpg`` and a ``cls`` in range, as many as the manifest says. Errors name the shard and the key.
    """
    for path, expected in split_shards(shards, manifest, split):
        keys: dict[str, set[str]] = {}
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if not member.isreg() or "/" in member.name:
                        continue
                    keys.setdefault(key, set()).add(ext)
                    if ext == "cls":
                        label_of(tar.extractfile(member).read(), key, path)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"shard {path} is not a readable tar file ({exc}); rerun `skinlesion prepare`") from exc
        for key, exts in keys.items():
            if not {"jpg", "cls"} <= exts:
                raise UserError(f"shard {path}: sample {key!r} lacks {sorted({'jpg', 'cls'} - exts)}")
        if len(keys) != expected:
            raise UserError(
                f"shard {path} holds {len(keys)} samples but {shards}/manifest.json says {expected}; "
                f"the shards changed after prepare: rerun `skinlesion prepare --overwrite`"
            )


def label_of(data: bytes, key: str, shard: Any) -> int:
    """A ``cls`` member as a class index, or an error naming the sample."""
    try:
        label = int(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        label = -1
    if not 0 <= label < len(CLASSES):
        raise UserError(f"shard {shard}: sample {key!r} has class {data[:20]!r}, not an index 0-{len(CLASSES) - 1}")
    return label


def batches_per_rank(samples: int, batch_size: int, world_size: int, multiple_of: int = 1) -> int:
    """Batches each rank draws per training epoch: the same on every rank, a multiple of grad_accum."""
    batches = samples // world_size // batch_size
    return batches - batches % multiple_of


def decode_sample(sample: dict[str, Any], transform: Transform) -> dict[str, Any]:
    """Decode the three members prepare writes; anything else in the sample is ignored, never unpickled."""
    where = f"sample {sample.get('__key__')!r} in {sample.get('__url__')}"
    for member in ("jpg", "cls"):
        if member not in sample:
            raise UserError(f"{where} has no {member!r} member; the shards were not written by skinlesion prepare")
    try:
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            image = transform(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{where}: its image does not decode ({exc}); rerun `skinlesion prepare`") from exc
    meta = json.loads(sample["json"].decode("utf-8")) if "json" in sample else {}
    label = label_of(sample["cls"], sample["__key__"], sample.get("__url__"))
    return {"image": image, "label": label, "key": sample["__key__"], "meta": meta}


def collate(samples: list[dict[str, Any]]) -> Batch:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _batched(samples: Iterator[dict[str, Any]], batch_size: int) -> Iterator[Batch]:
    while chunk := list(itertools.islice(samples, batch_size)):
        yield collate(chunk)


def _open_local(paths: Iterator[Path]) -> Iterator[dict[str, Any]]:
    """Each shard opened here as a local file: webdataset gets a stream, never a string it could treat
    as a URL or a ``pipe:`` shell command."""
    for path in paths:
        with open(path, "rb") as stream:
            yield {"url": str(path), "stream": stream}


def _read(paths: Iterator[Path]) -> Iterator[dict[str, Any]]:
    """Raw samples (bytes per member) of the tar files in `paths`, grouped by key by webdataset."""
    files = wds.tariterators.tar_file_expander(_open_local(paths), handler=wds.reraise_exception)
    return wds.tariterators.group_by_keys(files, handler=wds.reraise_exception)


def _shuffled(samples: Iterator[dict[str, Any]], buffer: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Reservoir shuffle: fill `buffer`, then emit a random element for every one read."""
    pool: list[dict[str, Any]] = []
    for sample in samples:
        pool.append(sample)
        if len(pool) >= buffer:
            i = rng.randrange(len(pool))
            pool[i], pool[-1] = pool[-1], pool[i]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


class TrainStream(IterableDataset):
    """One epoch of one rank's training batches; see the module docstring for how slots share shards."""

    def __init__(
        self,
        shards: list[tuple[Path, int]],
        *,
        image_size: int,
        batch_size: int,
        batches: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        skip_batches: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        self.shards, self.image_size, self.batch_size, self.batches = shards, image_size, batch_size, batches
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.skip_batches, self.shuffle_buffer = skip_batches, shuffle_buffer

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        slot, slots = self.rank * workers + worker, self.world_size * workers
        # The DataLoader takes batches from its workers round-robin, so batch i of the rank comes from
        # worker i % workers: that fixes each worker's share of the epoch and of the batches to skip.
        quota = _share(self.batches, worker, workers)
        skip = _share(self.skip_batches, worker, workers)
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot}")
        torch.manual_seed(rng.getrandbits(63))  # augmentation draws: reproducible per (seed, epoch, slot)

        order = [shard for shard in self.shards if shard[1] > 0]  # an empty shard would make cycle() spin
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)  # same on every rank and worker
        mine = [p for p, _ in order[slot::slots]] or [order[slot % len(order)][0]]

        def passes() -> Iterator[dict[str, Any]]:
            # Shuffle within a pass (the buffer drains at its end) so that one pass is one pass; a slot
            # whose shards run short of its quota starts another pass, in a new order.
            shard_order = mine
            while True:
                yield from _shuffled(_read(iter(shard_order)), self.shuffle_buffer, rng)
                shard_order = rng.sample(mine, len(mine))

        samples = itertools.islice(passes(), skip * self.batch_size, quota * self.batch_size)  # skip undecoded
        transform = train_transform(self.image_size)
        yield from _batched((decode_sample(s, transform) for s in samples), self.batch_size)


def _share(total: int, worker: int, workers: int) -> int:
    return total // workers + (1 if worker < total % workers else 0)


def train_loader(
    shards: Path,
    *,
    image_size: int,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    batches: int,
    skip_batches: int = 0,
    shuffle_buffer: int = 1000,
) -> DataLoader:
    """Exactly ``batches - skip_batches`` training batches for this rank in `epoch` (dict(image, label, key, meta)).

    `batches` must be the same on every rank (use `batches_per_rank`); `skip_batches` resumes an epoch
    mid-way without decoding the batches already trained on.
    """
    manifest = read_manifest(shards)
    files = split_shards(shards, manifest, "train")
    slots = world_size * max(num_workers, 1)
    if len(files) < slots and rank == 0 and epoch == 0 and skip_batches == 0:
        warnings.warn(
            f"{shards} has {len(files)} train shards for {world_size} ranks x {max(num_workers, 1)} workers: "
            f"some samples repeat within an epoch; prepare with --min-shards {slots} (or more) to avoid it",
            stacklevel=2,
        )
    stream = TrainStream(
        files,
        image_size=image_size,
        batch_size=batch_size,
        batches=batches,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch=epoch,
        skip_batches=skip_batches,
        shuffle_buffer=shuffle_buffer,
    )
    return _loader(stream, num_workers)


class EvalStream(IterableDataset):
    """Each sample of the split exactly once across all (rank, worker) slots, in shard order."""

    def __init__(self, shards: list[Path], image_size: int, batch_size: int, rank: int, world_size: int) -> None:
        self.shards, self.image_size, self.batch_size = shards, image_size, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        slot, slots = self.rank * workers + worker, self.world_size * workers
        transform = eval_transform(self.image_size)
        samples = _read(iter(self.shards[slot::slots]))
        yield from _batched((decode_sample(s, transform) for s in samples), self.batch_size)


def eval_loader(
    shards: Path, split: str, image_size: int, batch_size: int, num_workers: int, rank: int, world_size: int
) -> DataLoader:
    """Batches dict(image, label, key, meta) of `split`: every sample once across all ranks, none padded."""
    files = [path for path, _ in split_shards(shards, read_manifest(shards), split)]
    return _loader(EvalStream(files, image_size, batch_size, rank, world_size), num_workers)


def _loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # the stream batches itself
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
    )
