"""split_by_lesion and balance: no leakage between splits, stratified, deterministic, train-only balancing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skinlesion.data.split import balance, split_by_lesion


def _rows(seed: int = 0) -> pd.DataFrame:
    """~1,400 images of ~1,000 lesions over 7 classes, with HAM10000-like lesion sizes and imbalance."""
    rng = np.random.default_rng(seed)
    records = []
    for dx, n_lesions in {"nv": 600, "mel": 120, "bkl": 110, "bcc": 50, "akiec": 30, "vasc": 12, "df": 4}.items():
        for j in range(n_lesions):
            for k in range(int(rng.choice([1, 1, 1, 2, 3]))):
                records.append({"lesion_id": f"{dx}{j}", "image_id": f"{dx}{j}_{k}", "dx": dx})
    return pd.DataFrame(records)


def test_no_lesion_in_two_splits_and_fractions_per_class() -> None:
    rows = _rows()
    rows["split"] = split_by_lesion(rows, 0.15, 0.15, seed=0)
    assert rows["split"].notna().all()
    assert (rows.groupby("lesion_id")["split"].nunique() == 1).all()
    for dx, group in rows.groupby("dx"):
        shares = group["split"].value_counts(normalize=True)
        if len(group) > 100:  # large classes land within a few percent of 70/15/15
            assert shares["train"] == pytest.approx(0.70, abs=0.03), dx
            assert shares["val"] == pytest.approx(0.15, abs=0.03), dx
            assert shares["test"] == pytest.approx(0.15, abs=0.03), dx
        else:  # small classes still appear in every split
            assert set(group["split"]) == {"train", "val", "test"}, dx


def test_split_is_deterministic_for_a_seed_and_varies_with_it() -> None:
    rows = _rows()
    a, b, c = (split_by_lesion(rows, seed=s) for s in (0, 0, 1))
    assert a.equals(b)
    assert not a.equals(c)


def test_zero_val_fraction_leaves_val_empty() -> None:
    split = split_by_lesion(_rows(), val_fraction=0.0, test_fraction=0.2)
    assert "val" not in set(split)


@pytest.mark.parametrize(("val", "test"), [(0.5, 0.5), (-0.1, 0.2), (1.0, 0.0)])
def test_bad_fractions_are_refused(val: float, test: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        split_by_lesion(_rows(), val, test)


def test_balance_gives_exactly_n_per_class() -> None:
    rows = _rows()
    out = balance(rows, 100, seed=0)
    assert out["dx"].value_counts().to_dict() == dict.fromkeys(rows["dx"].unique(), 100)


def test_balance_subsamples_without_replacement_above_n() -> None:
    rows = _rows()
    nv = balance(rows, 100, seed=0).query("dx == 'nv'")
    assert nv["image_id"].is_unique and (nv["copy"] == 0).all()


def test_balance_repeats_every_row_evenly_below_n() -> None:
    rows = _rows()
    df_rows = rows[rows["dx"] == "df"]
    out = balance(rows, 100, seed=0).query("dx == 'df'")
    repeats = out["image_id"].value_counts()
    assert set(repeats.index) == set(df_rows["image_id"])  # no image left out by the luck of the draw
    assert repeats.max() - repeats.min() <= 1
    # copy numbers each repeat of an image: 0, 1, 2, ...
    for _, group in out.groupby("image_id"):
        assert sorted(group["copy"]) == list(range(len(group)))


def test_balance_is_shuffled_and_deterministic() -> None:
    rows = _rows()
    a, b = balance(rows, 50, seed=3), balance(rows, 50, seed=3)
    assert a.equals(b)
    assert a["dx"].iloc[:50].nunique() > 3  # classes are mixed, not in blocks
