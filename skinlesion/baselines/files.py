"""Loader throughput: WebDataset shards (skinlesion's train_loader) vs the same images as JPEG files.

The baseline is the original notebook's way: one JPEG file per image in class folders, read by
torchvision's ImageFolder with a shuffling DataLoader. Both sides decode the identical JPEG bytes
(extracted from the shards) with the identical train transform, batch size and worker count, and
both are timed over one full pass in the same run, alternating, best of --repeats.

    skinlesion bench files --shards shards --image-size 64 --batch-size 32 --workers 2
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from skinlesion.data.manifest import read_manifest, split_shards
from skinlesion.data.pipeline import batches_per_rank, train_loader
from skinlesion.data.transforms import train_transform


def extract_as_image_folder(shards: Path, out: Path) -> int:
    """Write every train sample's JPEG bytes to out/<class index>/<key>.jpg; returns the image count."""
    count = 0
    for path, _ in split_shards(shards, read_manifest(shards), "train"):
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if name.endswith(".jpg"):
                    key = name[: -len(".jpg")]
                    label = tar.extractfile(members[key + ".cls"]).read().decode()
                    (out / label).mkdir(parents=True, exist_ok=True)
                    (out / label / f"{Path(key).name}.jpg").write_bytes(tar.extractfile(member).read())
                    count += 1
    return count


def time_pass(loader) -> tuple[int, float]:
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += len(batch["label"] if isinstance(batch, dict) else batch[1])
    return images, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="skinlesion bench files", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=Path("shards"))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    samples = read_manifest(args.shards)["splits"]["train"]["samples"]
    batches = batches_per_rank(samples, args.batch_size, 1)
    with tempfile.TemporaryDirectory() as tmp:
        n_files = extract_as_image_folder(args.shards, Path(tmp))
        folder = ImageFolder(tmp, transform=train_transform(args.image_size))
        results: dict[str, list[float]] = {"shards": [], "jpeg files": []}
        for repeat in range(args.repeats):
            shard_loader = train_loader(
                args.shards,
                image_size=args.image_size,
                batch_size=args.batch_size,
                num_workers=args.workers,
                rank=0,
                world_size=1,
                seed=0,
                epoch=repeat,
                batches=batches,
            )
            files_loader = DataLoader(
                folder,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=args.workers,
                drop_last=True,
                persistent_workers=False,
            )
            for name, loader in (("shards", shard_loader), ("jpeg files", files_loader)):
                images, seconds = time_pass(loader)
                results[name].append(images / seconds)
    print(
        f"{samples} train samples ({n_files} JPEG files), {args.image_size} px, batch {args.batch_size}, "
        f"{args.workers} workers, best of {args.repeats} passes"
    )
    best = {name: max(rates) for name, rates in results.items()}
    for name, rate in best.items():
        print(f"{name:>11}: {rate:8.1f} images/s")
    print(f"ratio shards / jpeg files: {best['shards'] / best['jpeg files']:.2f}x")


if __name__ == "__main__":
    main()
