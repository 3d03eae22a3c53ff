"""The seven HAM10000 diagnoses: codes, full names, index order and which are malignant.

Class indices are the alphabetical order of the codes; shards, checkpoints, metrics and predictions
all rely on this single definition.
"""

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_TO_INDEX: dict[str, int] = {dx: i for i, dx in enumerate(CLASSES)}
NUM_CLASSES = len(CLASSES)

NAMES: dict[str, str] = {
    "akiec": "actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}

# Classes whose probabilities add up to the "malignant" probability shown to a dermatologist.
MALIGNANT: tuple[str, ...] = ("akiec", "bcc", "mel")

# Column order of the ISIC 2018 Task 3 submission format (header: image,MEL,NV,BCC,AKIEC,BKL,DF,VASC).
ISIC_ORDER: tuple[str, ...] = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")
