"""The page's two checks against their alternatives, on one trained model, in the same run.

1. Out-of-distribution scores, each thresholded at a 95% pass rate on the validation split: the share of the
   test split flagged, and of random noise, flat colour, colour gradients and synthetic skin with no lesion
   (30 images each), and with --real, of a folder of real dermoscopic images. Scores: what `skinlesion.card`
   uses (Mahalanobis distance to the nearest class mean, or a low centre-to-ring colour contrast), the same
   with layer3's feature contrast in place of the colour one, and each of: the Mahalanobis distance alone
   (the check before the contrast was added), the contrast alone, relative Mahalanobis (Ren et al. 2021),
   maximum softmax probability, and a low feature norm.
2. Grad-CAM on layer3 against layer4: over synthetic lesions the model never saw and classifies correctly,
   the share of the map's mass on the lesion (the generator knows where it drew it) against the lesion's
   share of the crop, which is what a uniform map would score.

    skinlesion bench checks --checkpoint runs/demo/best.pt --shards shards [--real DIR]
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
from skinlesion.data.lesions import make_lesion, not_lesions, render
from skinlesion.data.pipeline import eval_loader
from skinlesion.data.synthetic import _lesion_rng, plan
from skinlesion.data.transforms import eval_uint8
from skinlesion.labels import CLASSES
from skinlesion.model import load_for_inference
from skinlesion.ood import OODStats


def _outputs(model: torch.nn.Module, images: torch.Tensor) -> tuple[inference.Outputs, torch.Tensor]:
    """`inference.run` on uint8 images, and the centre-minus-ring mean of each layer3 channel [B, C3]."""
    runs, stage3 = [], []
    for chunk in images.split(64):
        runs.append(inference.run(model, chunk))
        with torch.inference_mode():
            maps = inference.forward(model, to_model_input(chunk))[2][0].double()
        h, w = maps.shape[-2:]
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[round(h / 4) : h - round(h / 4), round(w / 4) : w - round(w / 4)] = True
        stage3.append(maps[..., mask].mean(-1) - maps[..., ~mask].mean(-1))
    out = inference.Outputs(*(torch.cat([getattr(r, k) for r in runs]) for k in ("probs", "features", "contrast")))
    return out, torch.cat(stage3)


def _groups(size: int) -> dict[str, torch.Tensor]:
    return {k: torch.stack([inference.preprocess(im, size) for im in v]) for k, v in not_lesions(seed=0).items()}


def _split(shards: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(eval_loader(shards, split, size, 64, 0, 0, 1))
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


def _real(folder: Path, size: int) -> torch.Tensor:
    """Every .jpg/.png under `folder`, preprocessed like an upload."""
    images = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        with Image.open(path) as im:
            images.append(inference.preprocess(im.convert("RGB"), size))
    return torch.stack(images)


def ood_table(checkpoint: Path, shards: Path, real: Path | None = None) -> dict[str, dict[str, float]]:
    """Share flagged per group for each score, every threshold set on validation only (95% pass)."""
    loaded = load_for_inference(checkpoint)
    model, size = loaded.model, loaded.image_size
    train_images, y = _split(shards, "train", size)
    train, train_stage3 = _outputs(model, train_images)
    val, val_stage3 = _outputs(model, _split(shards, "val", size)[0])
    groups = {"test split": _split(shards, "test", size)[0]} | _groups(size)
    if real is not None:
        groups["real HAM10000 images"] = _real(real, size)
    others = {k: _outputs(model, v) for k, v in groups.items()}

    used = OODStats.fit(train.features, y, val)
    # The feature-space variant of the contrast: layer3's centre-minus-ring, per channel in units of the
    # channel's train spread, as a norm; combined with the distance exactly as the used check is.
    spread = train_stage3.std(0).clamp(min=1e-12)

    def with_stage3(o: inference.Outputs, stage3: torch.Tensor) -> inference.Outputs:
        return inference.Outputs(o.probs, o.features, (stage3 / spread).norm(dim=1))

    feature_variant = OODStats.fit(train.features, y, with_stage3(val, val_stage3))
    f = train.features.double()
    dim = f.shape[1]
    mu0 = f.mean(0)
    centred = f - mu0
    cov0 = centred.T @ centred / (len(f) - 1)
    p_global = torch.linalg.inv(cov0 + torch.eye(dim, dtype=cov0.dtype) * 1e-2 * cov0.diagonal().mean())

    def md0(x: torch.Tensor) -> torch.Tensor:
        x = x.double() - mu0
        return torch.einsum("bd,de,be->b", x, p_global, x)

    thresholded = {  # higher = more unusual, thresholded at the 95% validation point
        "mahalanobis, nearest class (before)": lambda o, _: used.distances(o.features),
        "low centre contrast alone": lambda o, _: -o.contrast.double(),
        "relative mahalanobis": lambda o, _: used.distances(o.features) - md0(o.features),
        "maximum softmax probability": lambda o, _: -o.probs.max(1).values.double(),
        "low feature norm": lambda o, _: -o.features.double().norm(dim=1),
    }
    table = {"mahalanobis or low centre contrast (used)": {}, "mahalanobis or low layer3 centre contrast": {}}
    for name, (o, stage3) in others.items():
        table["mahalanobis or low centre contrast (used)"][name] = _rate(used.scores(o) > used.threshold)
        flags = feature_variant.scores(with_stage3(o, stage3)) > feature_variant.threshold
        table["mahalanobis or low layer3 centre contrast"][name] = _rate(flags)
    for score_name, score in thresholded.items():
        threshold = torch.quantile(score(val, val_stage3), 0.95)
        table[score_name] = {k: _rate(score(o, s3) > threshold) for k, (o, s3) in others.items()}
    return table


def _rate(flags: torch.Tensor) -> float:
    return float(flags.double().mean())


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
    parser.add_argument("--real", type=Path, default=None, help="a folder of real dermoscopic images: share flagged")
    args = parser.parse_args(argv)
    table = ood_table(args.checkpoint, args.shards, args.real)
    print(json.dumps({"ood_flagged": table, "grad_cam": cam_shares(args.checkpoint)}, indent=2))


if __name__ == "__main__":
    main()
