"""Falsifiable checks of what the page shows, on a model trained like the demo's (smoke recipe, 64 px):
the out-of-distribution flag and the Grad-CAM heat map.

- OOD: at most 10% of the synthetic test split is flagged; random noise, flat colour, colour gradients and
  synthetic skin with no lesion are flagged at least 90% of the time. Skin with no lesion is the near miss that
  the feature distance alone lets through (3-10% flagged); the centre-contrast check is there for it
  (docs/serve.md), and the test requires that check on its own to catch them.
- Grad-CAM: on correctly classified synthetic images that the model never saw, the share of the map's mass
  inside the lesion (the generator knows where it drew it) is above the lesion's share of the image, which is
  what a uniform map would score, for the mean and for most images.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_cmd

from skinlesion import inference
from skinlesion.card import OOD
from skinlesion.data.lesions import make_lesion, not_lesions, render
from skinlesion.data.pipeline import eval_loader
from skinlesion.data.synthetic import _lesion_rng, generate, plan
from skinlesion.data.transforms import eval_uint8
from skinlesion.labels import CLASSES
from skinlesion.model import load_for_inference
from skinlesion.ood import OODStats

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run folder, shards) of the smoke recipe on 1,200 synthetic images, one process."""
    from skinlesion.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("checks")
    generate(root / "data", n_images=1200, seed=3, workers=2)
    prepare(
        PrepareOptions(
            metadata=root / "data/HAM10000_metadata.csv",
            out=root / "shards",
            image_size=72,
            images=(root / "data/HAM10000_images_part_1", root / "data/HAM10000_images_part_2"),
            samples_per_class=120,
            min_shards=4,
            seed=0,
        )
    )
    cmd = train_cmd(root / "run", root / "shards", "data.num_workers=0", "wandb.mode=disabled", tiny=False)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "run/model_card.json").is_file() and (root / "run" / OOD).is_file()
    return root / "run", root / "shards"


def test_ood_flags_few_test_images_and_most_non_dermoscopy(trained: tuple[Path, Path]) -> None:
    run, shards = trained
    loaded = load_for_inference(run / "best.pt")
    stats = OODStats.load(run / OOD, loaded.model.fc.in_features)
    size = loaded.image_size
    test = [inference.run(loaded.model, b["image"]) for b in eval_loader(shards, "test", size, 64, 0, 0, 1)]
    groups = {"synthetic test split": test}
    for kind, images in not_lesions(seed=0).items():
        groups[kind] = [inference.run(loaded.model, torch.stack([inference.preprocess(im, size) for im in images]))]
    flagged, by_distance, by_contrast = {}, {}, {}
    for kind, outputs in groups.items():
        flagged[kind] = float(torch.cat([stats.scores(o) > stats.threshold for o in outputs]).double().mean())
        distance = torch.cat([stats.distances(o.features) for o in outputs])
        by_distance[kind] = float((distance > stats.distance_threshold).double().mean())
        contrast = torch.cat([o.contrast for o in outputs])
        by_contrast[kind] = float((contrast < stats.contrast_threshold).double().mean())
    print(json.dumps({"flagged": flagged, "by distance": by_distance, "by contrast": by_contrast}))
    assert flagged["synthetic test split"] <= 0.10, flagged
    assert min(flagged[k] for k in ("noise", "flat colour", "gradient", "skin without a lesion")) >= 0.90, flagged
    # Plain skin must be caught by the check built for it, not by chance: the distance lets most of it
    # through (0-7% flagged over three seeds), while the contrast of every plain-skin image stayed below
    # 0.85 times its threshold. The distance's share is printed, not required: at its half of the 5% budget it
    # flagged 0-100% of noise depending on the seed (docs/serve.md).
    assert by_contrast["skin without a lesion"] >= 0.90, by_contrast


def test_grad_cam_points_at_the_lesion(trained: tuple[Path, Path]) -> None:
    run, _ = trained
    loaded = load_for_inference(run / "best.pt")
    size, shares, areas = loaded.image_size, [], []
    for row in plan(120, seed=77):  # lesions the model never saw
        lesion = make_lesion(_lesion_rng(77, int(row["_lesion"])), row["dx"])
        picture, region = render(lesion, _lesion_rng(77, int(row["_lesion"]), int(row["_shot"])), with_mask=True)
        x = inference.preprocess(picture, size)[None]
        if CLASSES[int(inference.run(loaded.model, x).probs[0].argmax())] != row["dx"]:
            continue
        cam = inference.grad_cam(loaded.model, x)[0][0]
        inside = eval_uint8(torch.from_numpy(region.astype(np.uint8) * 255)[None], size)[0] > 127  # same crop
        shares.append(float(cam[inside].sum() / cam.sum().clamp(min=1e-12)))
        areas.append(float(inside.float().mean()))
    print(json.dumps({"images": len(shares), "mean_share": np.mean(shares), "mean_area": np.mean(areas)}))
    assert len(shares) >= 60
    assert np.mean(shares) > 1.5 * np.mean(areas)
    assert np.mean(np.array(shares) > np.array(areas)) > 0.8
