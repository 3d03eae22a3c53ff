"""How far predict's probabilities for an original image file are from evaluate's for the same image's shard.

    python benchmarks/preprocess_parity.py --checkpoint RUN/best.pt --shards SHARDS --images FOLDER \
        [--shard-size 256] [--jpeg-quality 90]

Evaluate reads what `prepare` stored (the original resized to --image-size, re-encoded as JPEG) and resizes it
again to the model's input; a file handed to predict or serve is one image, not a shard. Three ways of turning
the file into the model's input are compared with evaluate's, on every sample of every split whose original
`<image_id>.jpg` lies in --images:

- ``one resize``: the original straight to the model's input (predict and serve before the shard facts);
- ``prepare's resize``: prepare's resize to the shard size, then evaluate's resize and centre crop, without
  the JPEG re-encoding;
- ``prepare + JPEG``: `inference.file_to_input`, prepare's whole path (resize and JPEG re-encoding) then
  evaluate's (what predict and serve do for a checkpoint that records its shard size and JPEG quality).

The shard size and JPEG quality are the checkpoint's facts unless given. Prints, per way, the largest
difference in malignant probability and in any class probability, and how many top-1 labels and
out-of-distribution flags (with the model card beside the checkpoint) differ from evaluate's, and the
median time each way takes from file bytes to the uint8 input (one core). CPU, one thread: deterministic.
"""

from __future__ import annotations

import argparse
import statistics
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from skinlesion import inference
from skinlesion.data.images import decode_rgb, process_bytes, resize_shorter
from skinlesion.data.manifest import read_manifest
from skinlesion.data.transforms import decode, eval_crop, eval_uint8, pil_to_uint8
from skinlesion.model import load_for_inference
from skinlesion.report import Calibration


def shard_images(shards: Path) -> dict[str, bytes]:
    """image_id -> the JPEG bytes prepare stored, over every split."""
    manifest, found = read_manifest(shards), {}
    for info in manifest["splits"].values():
        for name in info["files"]:
            with tarfile.open(shards / name, mode="r:") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if ext == "jpg" and member.isreg():
                        found[key] = tar.extractfile(member).read()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="the original <image_id>.jpg files")
    parser.add_argument("--shard-size", type=int, help="default: the checkpoint's shard_size")
    parser.add_argument("--jpeg-quality", type=int, help="default: the checkpoint's jpeg_quality")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_for_inference(args.checkpoint)
    size = loaded.image_size
    shard_size = args.shard_size if args.shard_size is not None else loaded.shard_size
    quality = args.jpeg_quality if args.jpeg_quality is not None else loaded.jpeg_quality
    if shard_size is None or quality is None:
        raise SystemExit(f"{args.checkpoint} records no shard size or JPEG quality: pass --shard-size, --jpeg-quality")
    calibration = Calibration.load(args.checkpoint, loaded)
    stored = shard_images(args.shards)
    keys = sorted(k for k in stored if (args.images / f"{k}.jpg").is_file())
    originals = {k: (args.images / f"{k}.jpg").read_bytes() for k in keys}

    def prepare_resize(data: bytes) -> torch.Tensor:
        return eval_uint8(pil_to_uint8(resize_shorter(decode_rgb(data), shard_size)), size)

    ways: dict[str, Callable[[bytes], torch.Tensor]] = {
        "one resize": lambda data: inference.preprocess(decode_rgb(data), size),
        "prepare's resize": prepare_resize if shard_size else lambda data: pil_to_uint8(decode_rgb(data)),
        "prepare + JPEG": lambda data: eval_uint8(decode(process_bytes(data, shard_size, quality=quality)), size),
    }

    def outputs(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = inference.run(loaded.model, torch.stack(images))
        malignant = [loaded.classes.index(c) for c in loaded.malignant]
        scores = torch.tensor([s if s is not None else float("nan") for s in calibration.scores(out)])
        return out.probs, out.probs[:, malignant].sum(1), scores

    crop = eval_crop(size)
    ref_probs, ref_malignant, ref_scores = outputs([crop(stored[k]) for k in keys])
    print(f"{len(keys)} images; model input {size} px; shards at {shard_size} px, JPEG quality {quality}")
    columns = ("max |d malignant|", 18), ("max |d prob|", 13), ("top-1 changed", 14), ("OOD flag changed", 17)
    print(f"{'way':<18} " + " ".join(f"{c:>{w}}" for c, w in columns) + f" {'ms/image':>9}")
    for name, way in ways.items():
        images, seconds = [], []
        for k in keys:
            started = time.perf_counter()
            images.append(way(originals[k]))
            seconds.append(time.perf_counter() - started)
        probs, malignant, scores = outputs(images)
        top1 = int((probs.argmax(1) != ref_probs.argmax(1)).sum())
        flags = int(((scores > 1) != (ref_scores > 1)).sum()) if calibration.ood else "no ood.pt"
        d_mal = float((malignant - ref_malignant).abs().max())
        d_prob = float((probs - ref_probs).abs().max())
        ms = statistics.median(seconds) * 1000
        print(f"{name:<18} {d_mal:>18.2e} {d_prob:>13.2e} {top1:>14} {flags!s:>17} {ms:>9.1f}")


if __name__ == "__main__":
    main()
