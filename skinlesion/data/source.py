"""Where a prepared dataset's images came from: the ``source`` entry of manifest.json.

The model card copies it (`card.training_source`), and the page and `skinlesion predict` show a banner for
any model that was not trained on real dermoscopy. A model trained on `skinlesion synth`'s pictures can score
a balanced accuracy of 0.95 on its synthetic test split and still match the recorded diagnosis of 18% of real
HAM10000 images, so the card must say which kind of data its numbers describe.

`skinlesion synth` gives every image an id from ``ISIC_9000000`` up and every lesion one from ``HAM_9000000``
(`synthetic.plan`), a range HAM10000 and the ISIC archive do not use (their ids start with 0). A row with both
ids in that range is counted as synthetic. Any synthetic row makes the whole dataset count as synthetic.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

SYNTHETIC_IMAGE_ID = re.compile(r"^ISIC_9\d{6}(_downsampled)?$")  # synth --layout isic2019 adds the suffix too
# Lesions (HAM10000, ISIC 2019) or patients (ISIC 2020) of synth's layouts; an ISIC 2019 row without a lesion_id
# is its own group, named by its image id.
SYNTHETIC_LESION_ID = re.compile(r"^((HAM|BCN|IP)_9\d{6}|ISIC_9\d{6}(_downsampled)?)$")
SYNTHETIC_NAME = "skinlesion synth (synthetic HAM10000-style pictures)"
LAYOUT_TITLES = {"ham10000": "HAM10000", "isic2019": "ISIC 2019", "isic2020": "ISIC 2020"}  # synth's layouts
GROUP_UNITS = {"lesion_id": "lesions", "patient_id": "patients", "image_id": "images"}


def synthetic_name(layout: str = "ham10000") -> str:
    """What synth's pictures are called on the card: in the layout they were written in (`synth --layout`)."""
    title = LAYOUT_TITLES.get(layout)
    return f"skinlesion synth (synthetic {title}-style pictures)" if title else "skinlesion synth (synthetic pictures)"


def group_unit(group_column: str) -> str:
    """The word for a dataset's grouping key in counts: lesions (HAM10000, ISIC 2019), patients (ISIC 2020)."""
    return GROUP_UNITS.get(group_column, f"groups ({group_column})")


def describe(
    metadata: Path, rows: pd.DataFrame, layout: str = "ham10000", group_column: str = "lesion_id"
) -> dict[str, Any]:
    """The source of `rows` (the metadata rows kept in the dataset) read from `metadata` (the CSV).

    ``kind`` is "synthetic" (every row from `skinlesion synth`), "mixed" or "real"; ``synthetic`` is True
    for the first two. ``dataset`` names the data: the CSV's name without ``_metadata`` (HAM10000 for
    HAM10000_metadata.csv), or synth's name in the dataset's `layout`. ``contributors`` counts the CSV's
    ``dataset`` column of real rows. ``images`` and ``groups`` count all splits together, ``group_unit`` (from
    `group_column`) says what a group is: the model card says what the train split alone held.
    """
    image_ids, lesion_ids = rows["image_id"].astype(str), rows["lesion_id"].astype(str)
    synthetic = image_ids.str.match(SYNTHETIC_IMAGE_ID.pattern) & lesion_ids.str.match(SYNTHETIC_LESION_ID.pattern)
    n_synthetic = int(synthetic.sum())
    kind = "synthetic" if n_synthetic == len(rows) else "mixed" if n_synthetic else "real"
    stem = Path(metadata).stem
    name = stem[: -len("_metadata")] if stem.lower().endswith("_metadata") else stem
    real = rows[~synthetic]
    contributors = real["dataset"].astype(str).value_counts().to_dict() if "dataset" in real.columns else {}
    return {
        "kind": kind,
        "synthetic": kind != "real",
        "dataset": synthetic_name(layout) if kind == "synthetic" else name,
        "metadata": Path(metadata).name,
        "images": len(rows),
        "synthetic_images": n_synthetic,
        "lesions": int(rows["lesion_id"].nunique()),  # the grouping key's count, whatever it is (kept for old readers)
        "groups": int(rows["lesion_id"].nunique()),
        "group_unit": group_unit(group_column),
        "contributors": {str(k): int(v) for k, v in contributors.items() if k},
    }
