"""The page's two checks against their alternatives, on one trained model, in the same run.

1. Out-of-distribution scores, each thresholded at a 95% pass rate on the validation split: the share of the
   test split flagged, and of random noise, flat colour, colour gradients and synthetic skin with no lesion
   (30 images each). Scores: the Mahalanobis distance to the nearest class mean (what `skinlesion.card`
   uses), relative Mahalanobis (Ren et al. 2021), maximum softmax probability, and a low feature norm.
2. Grad-CAM on layer3 against layer4: over synthetic lesions the model never saw and classifies correctly,
   the share of the map's mass on the lesion (the generator knows where it drew it) against the lesion's
   share of the crop, which is what a uniform map would score.

    skinlesion bench checks --checkpoint runs/demo/best.pt --shards shards
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image

from skinlesion import inference
from skinlesion.data.augment import to_model_input
from skinlesion.data.lesions import make_lesion, render
from skinlesion.data.pipeline import eval_loader
from skinlesion.data.synthetic import _lesion_rng, plan
from skinlesion.data.transforms import eval_uint8
from skinlesion.labels import CLASSES
from skinlesion.model import load_for_inference


def _outputs(model: torch.nn.Module, shards: Path, split: str, size: int) -> tuple[inference.Outputs, torch.Tensor]:
    runs, labels = [], []
    for batch in eval_loader(shards, split, size, 64, 0, 0, 1):
        runs.append(inference.run(model, batch["image"]))
        labels.append(batch["label"])
    probs = torch.cat([r.probs for r in runs])
    return inference.Outputs(probs=probs, features=torch.cat([r.features for r in runs]).double()), torch.cat(labels)


def _groups(size: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)

    def gradient() -> Image.Image:
        ramp = np.linspace(0, 1, 600)[None, :, None] * rng.uniform(0, 255, 3)
        ramp = ramp + np.linspace(0, 1, 450)[:, None, None] * rng.uniform(0, 255, 3)
        return Image.fromarray(np.clip(ramp / 2, 0, 255).astype(np.uint8))

    def skin(i: int) -> Image.Image:
        lesion = make_lesion(np.random.default_rng([5, i]), "nv")
        lesion.opacity, lesion.layers = 0.0, []
        return render(lesion, np.random.default_rng([6, i]))

    images = {
        "noise": [Image.fromarray(rng.integers(0, 256, (450, 600, 3), dtype=np.uint8)) for _ in range(30)],
        "flat colour": [Image.new("RGB", (600, 450), tuple(map(int, rng.integers(0, 256, 3)))) for _ in range(30)],
        "gradient": [gradient() for _ in range(30)],
        "skin without a lesion": [skin(i) for i in range(30)],
    }
    return {k: torch.stack([inference.preprocess(im, size) for im in v]) for k, v in images.items()}


def ood_table(checkpoint: Path, shards: Path) -> dict[str, dict[str, float]]:
    loaded = load_for_inference(checkpoint)
    model, size = loaded.model, loaded.image_size
    train, y = _outputs(model, shards, "train", size)
    val, _ = _outputs(model, shards, "val", size)
    test, _ = _outputs(model, shards, "test", size)
    others = {k: inference.run(model, v) for k, v in _groups(size).items()}
    f = train.features
    dim = f.shape[1]
    means = torch.stack([f[y == c].mean(0) for c in range(len(CLASSES))])

    def precision(centred: torch.Tensor) -> torch.Tensor:
        cov = centred.T @ centred / (len(centred) - 1)
        return torch.linalg.inv(cov + torch.eye(dim, dtype=cov.dtype) * 1e-2 * cov.diagonal().mean())

    p_class, mu0 = precision(f - means[y]), f.mean(0)
    p_global = precision(f - mu0)

    def md(x: torch.Tensor) -> torch.Tensor:
        d = x[:, None, :] - means[None]
        return torch.einsum("bcd,de,bce->bc", d, p_class, d).min(1).values

    def md0(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bd,de,be->b", x - mu0, p_global, x - mu0)

    scores = {
        "mahalanobis, nearest class (used)": lambda o: md(o.features.double()),
        "relative mahalanobis": lambda o: md(o.features.double()) - md0(o.features.double()),
        "maximum softmax probability": lambda o: -o.probs.max(1).values.double(),
        "low feature norm": lambda o: -o.features.double().norm(dim=1),
    }
    table = {}
    for name, score in scores.items():
        threshold = torch.quantile(score(val), 0.95)
        row = {"test split": float((score(test) > threshold).double().mean())}
        row |= {k: float((score(o) > threshold).double().mean()) for k, o in others.items()}
        table[name] = row
    return table


def cam_shares(checkpoint: Path, n_images: int = 150) -> dict[str, float]:
    loaded = load_for_inference(checkpoint)
    net, size = loaded.model, loaded.image_size
    shares: dict[str, list[float]] = {"layer3": [], "layer4": []}
    areas = []
    for row in plan(n_images, seed=99):
        lesion = make_lesion(_lesion_rng(99, int(row["_lesion"])), row["dx"])
        picture, region = render(lesion, _lesion_rng(99, int(row["_lesion"]), int(row["_shot"])), with_mask=True)
        x = inference.preprocess(picture, size)[None]
        if CLASSES[int(inference.run(net, x).probs[0].argmax())] != row["dx"]:
            continue
        inside = eval_uint8(torch.from_numpy(region.astype(np.uint8) * 255)[None], size)[0] > 127
        areas.append(float(inside.float().mean()))
        with torch.enable_grad():
            logits, _, stages = inference.forward(net, to_model_input(x))
            grads = torch.autograd.grad(logits[0, logits.argmax()], stages)
        for name, act, grad in zip(("layer3", "layer4"), stages, grads, strict=True):
            cam = torch.relu((grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True)).detach()
            cam = nnf.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
            shares[name].append(float(cam[inside].sum() / cam.sum().clamp(min=1e-12)))
    return {"images": len(areas), "lesion_area": float(np.mean(areas))} | {
        f"{k}_share": float(np.mean(v)) for k, v in shares.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="skinlesion bench checks", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="best.pt of a trained run")
    parser.add_argument("--shards", type=Path, required=True, help="the shards it was trained on")
    args = parser.parse_args(argv)
    print(json.dumps({"ood_flagged": ood_table(args.checkpoint, args.shards), "grad_cam": cam_shares(args.checkpoint)},
                     indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
