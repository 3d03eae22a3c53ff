"""Shared fixtures: one small synthetic HAM10000-style dataset and its shards per test session.

Building them once keeps the suite fast; tests that change data make their own copies.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import FINISHED, REPO, Cluster, cluster_nodes, job_info
from torchvision import models

from skinlesion.labels import CLASSES

SHARED_SAMPLE = REPO.parent / "shared" / "data" / "ham10000-sample"


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic dataset: HAM10000_metadata.csv + HAM10000_images_part_{1,2}/ (400 images)."""
    from skinlesion.data.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(out, n_images=400, seed=0)
    return out


@pytest.fixture(scope="session")
def shards_dir(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of `synthetic_dir` at 48 px (shorter side), train balanced to 40 per class, 4+ shards a split."""
    from skinlesion.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("prepared") / "shards"
    prepare(
        PrepareOptions(
            metadata=synthetic_dir / "HAM10000_metadata.csv",
            images=(synthetic_dir / "HAM10000_images_part_1", synthetic_dir / "HAM10000_images_part_2"),
            out=out,
            samples_per_class=40,
            image_size=48,
            min_shards=4,
            seed=0,
        )
    )
    return out


@pytest.fixture(scope="session")
def random_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What training leaves behind, for a random ResNet-18 at 32 px: model.pt and best.pt, written by the
    trainer's own export functions, and a plain.pt that is a foreign state_dict (the seed's format)."""
    from skinlesion.checkpoint import export_best, export_model
    from skinlesion.facts import ModelFacts

    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = models.resnet18(num_classes=7)
    with torch.no_grad():
        model.fc.weight.mul_(20)  # spread the logits so the top-k order is not a near-tie
    facts = ModelFacts(arch="resnet18", classes=CLASSES, image_size=32)
    export_model(model.state_dict(), out / "model.pt", facts)
    metric = {"name": "balanced_accuracy", "value": 0.5}
    export_best(model.state_dict(), out / "best.pt", facts=facts, epoch=1, step=10, metric=metric)
    torch.save({k: v for k, v in model.state_dict().items()}, out / "plain.pt")
    return out


@pytest.fixture(scope="session")
def calibrated(random_run: Path, shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of the random run with the model_card.json and ood.pt computed on its weights beside it
    (calibrated on the synthetic shards). Read it only: a test that changes the card works on a copy."""
    from skinlesion.card import calibrate
    from skinlesion.model import load_for_inference

    folder = tmp_path_factory.mktemp("calibrated")
    shutil.copy(random_run / "best.pt", folder / "best.pt")
    loaded = load_for_inference(folder / "best.pt")
    calibrate(loaded.model, folder / "best.pt", shards_dir, loaded.image_size, loaded.arch)
    return folder / "best.pt"


@pytest.fixture(scope="session")
def binary_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a random two-class ResNet-18 at 32 px, ISIC 2020's head (other, mel; mel malignant), no card."""
    from skinlesion.checkpoint import export_best
    from skinlesion.facts import ModelFacts

    out = tmp_path_factory.mktemp("binary")
    torch.manual_seed(0)
    model = models.resnet18(num_classes=2)
    with torch.no_grad():
        model.fc.weight.mul_(20)
    facts = ModelFacts(arch="resnet18", classes=("other", "mel"), image_size=32, malignant=("mel",))
    metric = {"name": "val_auc", "value": 0.5}
    export_best(model.state_dict(), out / "best.pt", facts=facts, epoch=1, step=10, metric=metric)
    return out


@pytest.fixture(scope="session")
def isic2020_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(raw, shards): synth's ISIC 2020 layout (240 images, patients, a duplicates list) and its 32-px shards."""
    from skinlesion.data.prepare import PrepareOptions, prepare
    from skinlesion.data.synthetic_isic import DUPLICATES_2020, GT_2020, IMAGES_2020, generate_isic

    root = tmp_path_factory.mktemp("isic2020")
    generate_isic(root / "raw", "isic2020", n_images=240, seed=1, workers=1)
    opts = PrepareOptions(
        metadata=root / "raw" / GT_2020,
        duplicates=root / "raw" / DUPLICATES_2020,
        images=(root / "raw" / IMAGES_2020,),
        out=root / "shards",
        dataset="isic2020",
        image_size=32,
        min_shards=1,
        workers=1,
    )
    prepare(opts)
    return root / "raw", root / "shards"


@pytest.fixture(scope="session")
def shared_sample() -> Path:
    """The real HAM10000 metadata and 150 images in ../shared; tests using it skip when it is absent."""
    if not (SHARED_SAMPLE / "HAM10000_metadata.csv").is_file():
        pytest.skip("../shared/data/ham10000-sample is not present")
    return SHARED_SAMPLE


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """The cluster `sinfo` answers for (the test module is skipped without one); leftover jobs are cancelled."""
    nodes = cluster_nodes()
    if nodes == 0:
        pytest.skip("no SLURM cluster answers `sinfo` (start one: slurm/local-cluster.sh start --nodes 2)")
    cluster = Cluster(nodes)
    yield cluster
    for job_id in cluster.jobs:
        if job_id > 0 and job_info(job_id).get("JobState") not in (*FINISHED, None):  # None: already purged
            subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=20)
