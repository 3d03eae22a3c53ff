"""What travels with a model (`ModelFacts`): architecture, classes, input size, malignant classes, and how its
training images were stored. Inference never guesses any of them: preprocessing a 64-px model at 224 px, or
reading its head in another class order, gives confident nonsense.

best.pt stores the facts as fields; model.pt carries them in ``state_dict._metadata[FACTS_KEY]`` (see
`skinlesion.model`). `ModelFacts.check` validates every field of a file before anything is allocated from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from skinlesion.config import IMAGE_SIZE_RANGE
from skinlesion.control_chars import control_character
from skinlesion.data.datasets import known_malignant
from skinlesion.data.images import MAX_STORED_SIZE
from skinlesion.errors import UserError

ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

FACTS_KEY = "skinlesion"  # model.pt's facts live in state_dict._metadata[FACTS_KEY], which torch.save keeps


JPEG_QUALITY_RANGE = (1, 100)  # PIL's quality scale


@dataclass(frozen=True)
class ModelFacts:
    """What inference must know about a model and never guesses: architecture, classes (in head order, from
    the dataset description it was trained on), input size, which classes are malignant, and how its
    training images were stored (`shard_size`: prepare's --image-size, 0 for original bytes; `jpeg_quality`).

    The last two let predict and serve turn a file into the model's input through the steps a shard image
    took (`inference.file_to_input`): without them a file is resized once, straight to `image_size`, and its
    probabilities differ from evaluate's on the shards (docs/evaluation.md). Files written before they were
    recorded have None, and predict and serve say that they fall back."""

    arch: str
    classes: tuple[str, ...]
    image_size: int
    malignant: tuple[str, ...] | None = None  # None: the preset's with these classes (HAM10000's for old files)
    shard_size: int | None = None
    jpeg_quality: int | None = None

    def __post_init__(self) -> None:
        if self.malignant is None:
            object.__setattr__(self, "malignant", known_malignant(tuple(self.classes)) or ())

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "classes": list(self.classes),
            "image_size": self.image_size,
            "malignant": list(self.malignant or ()),
        } | {k: v for k, v in (("shard_size", self.shard_size), ("jpeg_quality", self.jpeg_quality)) if v is not None}

    @classmethod
    def check(cls, raw: dict[str, Any], path: Path) -> ModelFacts:
        """Validate every field of a checkpoint before anything is allocated from it."""
        arch, classes, size = raw.get("arch"), raw.get("classes"), raw.get("image_size")
        if arch not in ARCHS:
            raise UserError(f"{path}: arch={arch!r} is not one of {', '.join(ARCHS)}; the file is damaged or foreign")
        if (
            not isinstance(classes, list | tuple)
            or len(classes) < 2
            or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)
        ):
            raise UserError(f"{path}: classes={classes!r} is not a list of two or more distinct class codes")
        for index, code in enumerate(classes):
            if (char := control_character(code)) is not None:  # it would reach terminals: see control_chars
                raise UserError(
                    f"{path}: class {index} ({code!r}) holds a control character ({char!r}); a class code is plain "
                    "text, so the file is damaged or forged: use a checkpoint written by skinlesion train"
                )
        low, high = IMAGE_SIZE_RANGE
        if not isinstance(size, int) or isinstance(size, bool) or not low <= size <= high:
            raise UserError(f"{path}: image_size={size!r} is not an integer from {low} to {high}")
        malignant = raw.get("malignant")
        if malignant is not None and (
            not isinstance(malignant, list | tuple)
            or not all(isinstance(m, str) for m in malignant)
            or not set(malignant) <= set(classes)
        ):
            raise UserError(f"{path}: malignant={malignant!r} is not a list of its classes {list(classes)}")
        # An empty list is a model with no malignant class (a custom dataset without one), not a missing field:
        # only a file that predates the field gets the preset's (`known_malignant`).
        shard_size, quality = raw.get("shard_size"), raw.get("jpeg_quality")
        for key, value, ok in (("shard_size", shard_size, _shard_size_ok), ("jpeg_quality", quality, _quality_ok)):
            if value is not None and not ok(value):
                raise UserError(f"{path}: {key}={value!r} is not {ok.__doc__}; the file is damaged or foreign")
        return cls(
            arch=arch,
            classes=tuple(classes),
            image_size=size,
            malignant=None if malignant is None else tuple(malignant),
            shard_size=shard_size,
            jpeg_quality=quality,
        )

    def stored_as(self, manifest: dict[str, Any], where: str) -> ModelFacts:
        """These facts plus how the training shards' images were stored: the manifest's ``image_size``
        (prepare's --image-size) as `shard_size` and its ``jpeg_quality``, both checked. A manifest written
        before ``jpeg_quality`` was recorded leaves both None: its quality is not guessed."""
        if "jpeg_quality" not in manifest:
            return self
        size, quality = manifest.get("image_size"), manifest.get("jpeg_quality")
        for key, value, ok in (("image_size", size, _shard_size_ok), ("jpeg_quality", quality, _quality_ok)):
            if not ok(value):
                raise UserError(
                    f"{where}: {key}={value!r} is not {ok.__doc__}; the manifest is damaged (rerun prepare)"
                )
        return replace(self, shard_size=size, jpeg_quality=quality)


def _shard_size_ok(value: Any) -> bool:
    """0 (original bytes) or an integer from 16 to 4096 (prepare's --image-size)"""
    return _whole(value) and (value == 0 or 16 <= value <= MAX_STORED_SIZE)


def _quality_ok(value: Any) -> bool:
    """an integer from 1 to 100 (a JPEG quality)"""
    return _whole(value) and JPEG_QUALITY_RANGE[0] <= value <= JPEG_QUALITY_RANGE[1]


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
