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

Only the ``jpg``, ``cls`` and ``json`` members of a sample are decoded (libjpeg-turbo or PIL, int, json):
nothing in a shard is ever unpickled. Shards are opened here as local files and handed to webdataset as
streams. Evaluation batches are uint8 (`transforms.eval_crop`); training batches are uint8 tiles for the
device path or normalised float32 for the CPU path (see `transforms`). Loaders are plain DataLoaders
that must NOT go through accelerator.prepare (it would re-split the already split stream); callers move
batches to the device themselves.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from skinlesion.data.device_decode import pack, train_geometry
from skinlesion.data.manifest import label_of, read_manifest, split_shards
from skinlesion.data.transforms import eval_crop, train_crop, train_transform
from skinlesion.errors import UserError

Batch = dict[str, Any]
log = logging.getLogger(__name__)


def batches_per_rank(samples: int, batch_size: int, world_size: int, multiple_of: int = 1) -> int:
    """Batches each rank draws per training epoch: the same on every rank, a multiple of grad_accum."""
    batches = samples // world_size // batch_size
    return batches - batches % multiple_of


class BadSample(Exception):
    """A sample whose image does not decode; training skips it, evaluation stops on it."""


Decoder = Callable[[bytes], dict[str, torch.Tensor]]


def decoder(kind: str, image_size: int) -> Decoder:
    """JPEG bytes -> the image fields of a sample, per loader kind.

    ``device``: uint8 tile + affine (`transforms.train_crop`); ``cpu``: the augmented, normalised float
    image (`transforms.train_transform`); ``eval``: the uint8 evaluation crop (`transforms.eval_crop`);
    ``jpeg`` (data.decode=device): the bytes, undecoded, with the crop geometry drawn from the header
    (`device_decode.train_geometry`; the device decodes them with `device_decode.decode_batch`).
    """
    if kind == "jpeg":
        return train_geometry(image_size)
    if kind == "device":
        crop = train_crop(image_size)

        def device(data: bytes) -> dict[str, torch.Tensor]:
            tile, affine = crop(data)
            return {"image": tile, "affine": affine}

        return device
    if kind == "cpu":
        augment = train_transform(image_size)

        def cpu(data: bytes) -> dict[str, torch.Tensor]:
            with Image.open(io.BytesIO(data)) as img:
                return {"image": augment(img.convert("RGB"))}

        return cpu
    evaluate = eval_crop(image_size)
    return lambda data: {"image": evaluate(data)}


def decode_sample(sample: dict[str, Any], decode: Decoder) -> dict[str, Any]:
    """Decode the three members prepare writes; anything else in the sample is ignored, never unpickled."""
    where = f"sample {sample.get('__key__')!r} in {sample.get('__url__')}"
    for member in ("jpg", "cls"):
        if member not in sample:
            raise UserError(f"{where} has no {member!r} member; the shards were not written by skinlesion prepare")
    label = label_of(sample["cls"], sample["__key__"], sample.get("__url__"))
    try:
        fields = decode(sample["jpg"])
    except (RuntimeError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadSample(f"{where}: its image does not decode ({' '.join(str(exc).split())[:200]})") from exc
    meta = json.loads(sample["json"].decode("utf-8")) if "json" in sample else {}
    return {**fields, "label": label, "key": sample["__key__"], "meta": meta}


def _decode_all(samples: Iterator[dict[str, Any]], decode: Decoder) -> Iterator[dict[str, Any]]:
    """Evaluation reads every sample: one that does not decode is an error naming it."""
    for sample in samples:
        try:
            yield decode_sample(sample, decode)
        except BadSample as exc:
            raise UserError(f"{exc}; evaluation needs every sample: rerun `skinlesion prepare`") from None


class _SkipBad:
    """Training skips a sample that does not decode: counted, and logged once per loader worker."""

    def __init__(self, decode: Decoder) -> None:
        self.decode, self.skipped, self.seen, self.reported = decode, 0, 0, False

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            self.seen += 1
            try:
                yield decode_sample(sample, self.decode)
            except BadSample as exc:
                self.skipped += 1
                if not self.reported:
                    self.reported = True
                    log.warning("skipping %s; later ones are only counted (train/skipped_samples)", exc)
                if self.skipped >= 100 and self.skipped * 2 > self.seen:  # else a slot of bad shards spins forever
                    raise UserError(
                        f"{self.skipped} of {self.seen} samples do not decode (latest: {exc}); "
                        "the shards are damaged: rerun `skinlesion prepare`"
                    ) from None


def collate(samples: list[dict[str, Any]]) -> Batch:
    """Samples -> a batch: tensors stacked, except JPEG bytes (of varying length), which are packed into one
    flat tensor plus offsets (`device_decode.pack`)."""
    batch: Batch = {
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }
    if "jpeg" in samples[0]:
        batch["jpeg"], batch["jpeg_offsets"] = pack([s["jpeg"] for s in samples])
        batch["tile_size"] = samples[0]["tile_size"]
    for name in ("image", "affine", "size", "box"):
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _batched(samples: Iterator[dict[str, Any]], batch_size: int, skips: _SkipBad | None = None) -> Iterator[Batch]:
    """Batches of `batch_size` (the last may be smaller); with `skips`, each says how many samples it skipped."""
    reported = 0
    while chunk := list(itertools.islice(samples, batch_size)):
        batch = collate(chunk)
        if skips is not None:
            batch["skipped"] = skips.skipped - reported
            reported = skips.skipped
        yield batch


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
    """One rank's training batches for `epochs` epochs from `epoch`; see the module docstring for how slots
    share shards. One stream for the whole run keeps the loader's workers alive from epoch to epoch: a new
    DataLoader per epoch starts its workers again (seconds with many workers, while the GPU idles)."""

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
        epochs: int = 1,
        skip_batches: int = 0,
        shuffle_buffer: int = 1000,
        augment: str = "cpu",
    ) -> None:
        self.shards, self.image_size, self.batch_size, self.batches = shards, image_size, batch_size, batches
        self.rank, self.world_size, self.seed, self.epoch, self.epochs = rank, world_size, seed, epoch, epochs
        self.skip_batches, self.shuffle_buffer, self.augment = skip_batches, shuffle_buffer, augment

    def __iter__(self) -> Iterator[Batch]:
        # The DataLoader takes batches from its workers round-robin: the k-th batch it yields comes from worker
        # k % workers. Batch i of an epoch must come from the same *logical* worker whatever the run's start
        # (an uninterrupted run, or a resume mid-epoch), since that fixes which shards and random draws it
        # gets. So each epoch this worker plays the logical worker whose batches land on it, given how many
        # batches the stream has yielded before the epoch's batch 0.
        worker, workers = _worker()
        before = -self.skip_batches  # stream position of the first epoch's batch 0 (its skipped ones not yielded)
        for epoch in range(self.epoch, self.epoch + self.epochs):
            skip = self.skip_batches if epoch == self.epoch else 0
            yield from self._epoch(epoch, (worker - before) % workers, workers, skip)
            before += self.batches

    def _epoch(self, epoch: int, worker: int, workers: int, skip_batches: int) -> Iterator[Batch]:
        """Logical `worker`'s batches of `epoch`: those with index i % workers == worker, from `skip_batches`."""
        slot, slots = self.rank * workers + worker, self.world_size * workers
        quota = _share(self.batches, worker, workers)
        skip = _share(skip_batches, worker, workers)
        rng = random.Random(f"{self.seed}/{epoch}/{slot}")
        torch.manual_seed(rng.getrandbits(63))  # augmentation draws: reproducible per (seed, epoch, slot)

        order = [shard for shard in self.shards if shard[1] > 0]  # an empty shard would make cycle() spin
        random.Random(f"{self.seed}/{epoch}").shuffle(order)  # same on every rank and worker
        mine = [p for p, _ in order[slot::slots]] or [order[slot % len(order)][0]]

        def passes() -> Iterator[dict[str, Any]]:
            # Shuffle within a pass (the buffer drains at its end) so that one pass is one pass; a slot
            # whose shards run short of its quota starts another pass, in a new order.
            shard_order = mine
            while True:
                yield from _shuffled(_read(iter(shard_order)), self.shuffle_buffer, rng)
                shard_order = rng.sample(mine, len(mine))

        raw = passes()
        for _ in itertools.islice(raw, skip * self.batch_size):  # batches trained before a resume: not decoded
            pass
        skips = _SkipBad(decoder(self.augment, self.image_size))
        samples = itertools.islice(skips(raw), (quota - skip) * self.batch_size)  # a skipped sample is replaced
        yield from _batched(samples, self.batch_size, skips)


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
    epochs: int = 1,
    skip_batches: int = 0,
    shuffle_buffer: int = 1000,
    augment: str = "cpu",
    decode: str = "cpu",
    manifest: dict | None = None,
) -> DataLoader:
    """Exactly ``batches - skip_batches`` training batches for this rank in `epoch`, then `batches` for each of
    the next ``epochs - 1`` epochs, from one set of workers: dict(image, label, key,
    meta, skipped), plus ``affine`` with ``augment="device"`` (uint8 images, augmented later on the device by
    `data.augment.augment`); ``augment="cpu"`` gives augmented, normalised float32 images; ``decode="device"``
    (with ``augment="device"``) ships JPEG bytes and crop geometry instead of tiles, for
    `data.device_decode.decode_batch`.

    `batches` must be the same on every rank (use `batches_per_rank`); `skip_batches` resumes an epoch
    mid-way without decoding the batches already trained on. A sample whose image does not decode is
    skipped, replaced by the next one, logged once and counted in each batch's ``skipped``. The trainer
    passes the `manifest` it read at start, so a whole run sees one version of the folder.
    """
    manifest = manifest or read_manifest(shards)
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
        epochs=epochs,
        skip_batches=skip_batches,
        shuffle_buffer=shuffle_buffer,
        augment="jpeg" if decode == "device" else augment,
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
        samples = _read(iter(self.shards[slot::slots]))
        yield from _batched(_decode_all(samples, decoder("eval", self.image_size)), self.batch_size)


def eval_loader(
    shards: Path,
    split: str,
    image_size: int,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    manifest: dict | None = None,
    persistent: bool = False,
) -> DataLoader:
    """Batches dict(image, label, key, meta) of `split`: every sample once across all ranks, none padded.
    `persistent`: the workers stay up between passes (training validates with one loader every epoch)."""
    files = [path for path, _ in split_shards(shards, manifest or read_manifest(shards), split)]
    return _loader(EvalStream(files, image_size, batch_size, rank, world_size), num_workers, persistent)


def _loader(dataset: IterableDataset, num_workers: int, persistent: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # the stream batches itself
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=persistent and num_workers > 0,
    )
