"""Lesion-grouped, dx-stratified train/val/test split, and train-only class balancing.

The seed balanced first and split afterwards, so copies of one image and images of one lesion
landed on both sides of the split. Here whole lesions are assigned to one split (45% of
HAM10000's images share their lesion with another image), per class, and only the train split is
resampled; val and test keep the natural distribution with every image once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def split_by_lesion(
    rows: pd.DataFrame,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    stratify: str = "majority",
) -> pd.Series:
    """The split name of each row (indexed like rows): no lesion_id in two splits, every dx stratified.

    Per class, lesions are shuffled with the seed and placed largest first, each into the split
    that is furthest below its target image count (a greedy bin fill that lands within one lesion of
    the fractions). A class with at least three lesions gets at least one in each of val and test
    (when their fractions are above zero), so small classes can still be evaluated.

    `lesion_id` is the grouping key (a patient for ISIC 2020). A group's stratum is its most frequent dx
    (``stratify="majority"``), or its rarest one (``"rarest"``): a patient with 1 melanoma among 20 nevi is a
    melanoma patient, so ISIC 2020's 1.8% melanomas spread evenly over the splits.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} + test_fraction {test_fraction} must be in [0, 1)")
    fractions = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction])
    rng = np.random.default_rng(seed)
    if stratify not in ("majority", "rarest"):
        raise ValueError(f"stratify must be majority or rarest, got {stratify!r}")
    # A lesion's class is its most frequent dx (HAM10000 has one per lesion; ties go alphabetically).
    pairs = rows.groupby(["lesion_id", "dx"]).size().rename("n").reset_index()
    if stratify == "rarest":  # rank by the class's frequency in the whole dataset, rarest first
        pairs["n"] = -pairs["dx"].map(rows["dx"].value_counts())
    pairs = pairs.sort_values(["lesion_id", "n", "dx"], ascending=[True, False, True], kind="stable")
    lesion_dx = pairs.drop_duplicates("lesion_id").set_index("lesion_id")["dx"]
    lesion_size = rows.groupby("lesion_id").size()
    assignment: dict[str, str] = {}
    for dx in sorted(lesion_dx.unique()):
        lesions = lesion_dx.index[lesion_dx == dx].to_numpy()
        lesions = lesions[rng.permutation(len(lesions))]
        sizes = lesion_size[lesions].to_numpy()
        order = np.argsort(-sizes, kind="stable")  # largest first; shuffled among equal sizes
        target = fractions * sizes.sum()
        filled = np.zeros(3)
        placed = 0
        if len(lesions) >= 3:  # seed val and test with the smallest lesions
            for split in (1, 2):
                if fractions[split] > 0:
                    i = order[len(order) - 1 - placed]
                    assignment[lesions[i]] = SPLITS[split]
                    filled[split] += sizes[i]
                    placed += 1
        for i in order[: len(order) - placed]:
            split = int(np.argmax(target - filled))  # ties: train, then val, then test
            assignment[lesions[i]] = SPLITS[split]
            filled[split] += sizes[i]
    return rows["lesion_id"].map(assignment)


def balance(rows: pd.DataFrame, samples_per_class: int, seed: int = 0) -> pd.DataFrame:
    """Exactly samples_per_class rows per dx (the seed's SAMPLE_PER_GROUP), in a shuffled order.

    A class with more rows is subsampled without replacement; a class with fewer repeats every row
    as evenly as possible (each row k or k+1 times, the remainder drawn without replacement), which
    is resampling with replacement without the luck of the draw leaving images out. A `copy`
    column numbers the repeats of a row (0 for its first appearance). A class without rows stays
    empty: there is nothing to resample.
    """
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be at least 1, got {samples_per_class}")
    rng = np.random.default_rng(seed)
    picks = []
    for _, group in rows.groupby("dx", sort=True):
        n = len(group)
        reps, rest = divmod(samples_per_class, n)
        index = np.concatenate([np.tile(np.arange(n), reps), rng.choice(n, size=rest, replace=False)])
        picked = group.iloc[np.sort(index, kind="stable")].copy()
        picked["copy"] = picked.groupby(level=0).cumcount().to_numpy()
        picks.append(picked)
    if not picks:
        return rows.assign(copy=0)
    out = pd.concat(picks)
    return out.iloc[rng.permutation(len(out))].reset_index(drop=True)
