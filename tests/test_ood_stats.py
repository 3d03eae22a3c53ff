"""ood.OODStats on made-up features: the two checks, their joint validation pass rate, and ood.pt's format.

Fast and model-free; tests/test_model_checks.py measures the flag on a trained model and real-looking inputs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from skinlesion.errors import UserError
from skinlesion.inference import Outputs, centre_contrast
from skinlesion.ood import PASS_RATE, OODStats

D = 16


def _outputs(features: torch.Tensor, contrast: torch.Tensor) -> Outputs:
    return Outputs(probs=torch.full((len(features), 7), 1 / 7), features=features, contrast=contrast)


@pytest.fixture(scope="module")
def fitted() -> tuple[OODStats, Outputs]:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(7, D, generator=gen) * 4
    labels = torch.arange(7).repeat(100)
    train = centres[labels] + torch.randn(700, D, generator=gen)
    val_labels = torch.arange(7).repeat(60)
    val = _outputs(centres[val_labels] + torch.randn(420, D, generator=gen), 0.5 + torch.rand(420, generator=gen))
    return OODStats.fit(train, labels, val), val


def test_the_two_checks_together_pass_the_validation_rate(fitted: tuple[OODStats, Outputs]) -> None:
    stats, val = fitted
    flagged = float((stats.scores(val) > stats.threshold).double().mean())
    # Independent checks, each given about half of the 5%: the union lands within one image of 5%.
    assert 1 - PASS_RATE - 2 / 420 <= flagged <= 1 - PASS_RATE + 1e-9
    assert 0.5 < stats.contrast_threshold < 0.6 and stats.distance_threshold > D


def test_either_check_flags_and_scores_stay_finite(fitted: tuple[OODStats, Outputs]) -> None:
    stats, val = fitted
    typical = val.features[:3]
    far = _outputs(typical + 100, torch.ones(3))  # unlike every class, with a lesion-like contrast
    plain = _outputs(typical, torch.tensor([0.0, 1e-9, stats.contrast_threshold / 2]))  # familiar, no contrast
    assert bool((stats.scores(far) > stats.threshold).all()) and bool((stats.scores(plain) > stats.threshold).all())
    assert torch.isfinite(stats.scores(plain)).all() and float(stats.scores(plain).max()) == pytest.approx(1000)
    assert not bool((stats.scores(_outputs(typical, torch.ones(3))) > stats.threshold).any())


def test_a_contrast_threshold_of_zero_gives_finite_scores(fitted: tuple[OODStats, Outputs]) -> None:
    """A validation split with a perfectly flat image fits contrast threshold 0; a flat image then scored 0 / 0,
    and NaN in the JSON made /api/predict answer 500."""
    stats = replace(fitted[0], contrast_threshold=0.0)
    scores = stats.scores(_outputs(fitted[1].features[:2], torch.zeros(2)))
    assert torch.isfinite(scores).all()


def test_centre_contrast_is_zero_for_flat_images_and_linear_ramps_and_not_for_a_centred_spot() -> None:
    flat = torch.full((1, 3, 64, 64), 0.3)
    ramp = torch.linspace(-1, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64)
    spot = flat.clone()
    spot[..., 24:40, 24:40] = -1.0
    assert float(centre_contrast(flat)[0]) < 1e-6 and float(centre_contrast(ramp)[0]) < 1e-6
    assert float(centre_contrast(spot)[0]) > 0.5


def test_ood_file_round_trips_and_refuses_old_or_foreign(fitted: tuple[OODStats, Outputs], tmp_path: Path) -> None:
    stats, val = fitted
    with pytest.raises(ValueError, match="digest"):
        stats.save(tmp_path / "ood.pt")  # an ood.pt must say which weights it belongs to
    stats = replace(stats, weights="ab" * 32)
    stats.save(tmp_path / "ood.pt")
    loaded = OODStats.load(tmp_path / "ood.pt", D)
    assert torch.allclose(loaded.scores(val), stats.scores(val), rtol=1e-4) and loaded.weights == "ab" * 32
    with pytest.raises(UserError, match="does not fit this model"):
        OODStats.load(tmp_path / "ood.pt", D + 1)
    old = {"means": stats.means, "precision": stats.precision, "threshold": torch.tensor(30.0)}  # before format 2
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(UserError, match=r"older skinlesion .*skinlesion evaluate --checkpoint .* --split val"):
        OODStats.load(tmp_path / "old.pt", D)
    raw = torch.load(tmp_path / "ood.pt", weights_only=True)
    del raw["weights_sha256"]
    torch.save(raw | {"format": torch.tensor(2)}, tmp_path / "v2.pt")  # contrast check, no weights digest
    with pytest.raises(UserError, match=r"older skinlesion \(ood.pt format 2; this one reads 3"):
        OODStats.load(tmp_path / "v2.pt", D)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a readable skinlesion OOD file"):
        OODStats.load(tmp_path / "junk.pt", D)
