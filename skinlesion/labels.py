"""HAM10000's seven diagnoses, read from its dataset description (`data.datasets.HAM10000`).

These are no longer what every stage relies on: shards, checkpoints, metrics and predictions take their
classes from the manifest's dataset description or the checkpoint's facts. The names remain for the
default (zero-config) path and for files that predate descriptions, which are HAM10000's.
"""

from skinlesion.data.datasets import HAM10000

CLASSES: tuple[str, ...] = HAM10000.codes
CLASS_TO_INDEX: dict[str, int] = {dx: i for i, dx in enumerate(CLASSES)}
NUM_CLASSES = len(CLASSES)
NAMES: dict[str, str] = HAM10000.names
MALIGNANT: tuple[str, ...] = HAM10000.malignant
# Column order of the ISIC 2018 Task 3 submission format (header: image,MEL,NV,BCC,AKIEC,BKL,DF,VASC).
ISIC_ORDER: tuple[str, ...] = tuple(code for _, code in HAM10000.submission if code is not None)
