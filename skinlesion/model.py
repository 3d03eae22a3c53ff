"""The classifier: a torchvision ResNet with its fc replaced by a 7-class head (the seed's model).

Everything that reads weights a user hands over goes through `load_weights`, which uses
``torch.load(weights_only=True)``: a file whose unpickling would run code is refused, not executed.
The architecture of a bare state_dict is read off its keys (`infer_arch`), so a ResNet-18 run's
``model.pt`` predicts as readily as a ResNet-50's.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models

from skinlesion.errors import UserError
from skinlesion.labels import CLASSES, NUM_CLASSES

ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# Blocks per stage (layer1..layer4) and block type identify a torchvision ResNet uniquely.
_BLOCKS: dict[tuple[tuple[int, ...], bool], str] = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}

# Prefixes that wrappers add to parameter names: DDP ("module."), torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference and what was saved with it."""

    model: nn.Module
    arch: str
    classes: tuple[str, ...]
    image_size: int
    source: Path


def build_model(arch: str = "resnet50", pretrained: str = "none", num_classes: int = NUM_CLASSES) -> nn.Module:
    """Build `arch` with a `num_classes` head; `pretrained` is none | imagenet | a state_dict path.

    ImageNet weights initialise the backbone only (their 1000-class fc is dropped); a local
    state_dict may hold either a backbone (fc ignored when its shape differs) or a full 7-class model.
    """
    if arch not in ARCHS:
        raise UserError(f"model.name={arch!r} is not a torchvision ResNet; choose one of {', '.join(ARCHS)}")
    if pretrained == "none":
        return getattr(models, arch)(num_classes=num_classes)
    if pretrained == "imagenet":
        weights = models.get_model_weights(arch).DEFAULT
        try:
            model = getattr(models, arch)(weights=weights)
        except Exception as exc:  # URLError, OSError, hash mismatch: all mean "no weights here"
            raise UserError(
                f"could not get ImageNet weights for {arch} ({exc}); on a machine without internet, "
                f"download {weights.url} elsewhere and pass model.pretrained=/path/to/file.pth"
            ) from exc
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model
    model = getattr(models, arch)(num_classes=num_classes)
    state = strip_wrapper_prefixes(load_weights(Path(pretrained)))
    if state.get("fc.weight") is not None and state["fc.weight"].shape != model.fc.weight.shape:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise UserError(
            f"{pretrained} does not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            f"pass a state_dict saved from torchvision's {arch}"
        )
    return model


def load_weights(path: Path) -> dict[str, Any]:
    """Read a checkpoint file safely; return its state_dict, or the dict saved by training (best.pt).

    Only tensors and plain containers are accepted (``weights_only=True``): pickled code is refused.
    """
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"refusing to load {path}: it holds pickled objects beyond tensors and plain containers "
            f"(loading it could run code). Only load checkpoints written by skinlesion or plain state_dicts. "
            f"Detail: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({exc}); was it fully written?") from exc
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return obj


def strip_wrapper_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Remove DDP/torch.compile prefixes so that a state_dict loads into a bare torchvision model."""
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def infer_arch(state: dict[str, Any]) -> str:
    """Name the torchvision ResNet a state_dict belongs to, from its block counts and block type."""
    blocks = []
    for stage in range(1, 5):
        indices = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")}
        blocks.append(len(indices))
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    arch = _BLOCKS.get((tuple(blocks), bottleneck))
    if arch is None:
        raise UserError(f"the state_dict is not a torchvision ResNet (blocks per stage {blocks})")
    return arch


def load_for_inference(path: Path, default_image_size: int = 224) -> LoadedModel:
    """Load model.pt (a plain state_dict) or best.pt (training's dict with metadata) for inference.

    best.pt carries ``arch``, ``classes`` and ``image_size``; for a plain state_dict the architecture
    is inferred from its keys and the image size taken from a ``config.yaml`` beside it (what
    training writes), else `default_image_size`.
    """
    obj = load_weights(path)
    if "model" in obj and isinstance(obj["model"], dict):
        state = strip_wrapper_prefixes(obj["model"])
        arch = str(obj.get("arch") or infer_arch(state))
        classes = tuple(obj.get("classes") or CLASSES)
        image_size = int(obj.get("image_size") or default_image_size)
    else:
        state = strip_wrapper_prefixes(obj)
        arch = infer_arch(state)
        classes = CLASSES
        image_size = _image_size_beside(path) or default_image_size
    if tuple(classes) != CLASSES:
        raise UserError(f"{path} was trained on classes {list(classes)}, expected {list(CLASSES)}")
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else NUM_CLASSES
    model = getattr(models, arch)(num_classes=num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path} does not load into {arch}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return LoadedModel(model=model, arch=arch, classes=CLASSES, image_size=image_size, source=path)


def _image_size_beside(path: Path) -> int | None:
    """The data.image_size of the training run that wrote `path`, if its config.yaml is next to it."""
    import yaml

    for folder in (path.parent, path.parent.parent):
        config = folder / "config.yaml"
        if config.is_file():
            try:
                size = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("image_size")
            except yaml.YAMLError:
                return None
            return int(size) if size else None
    return None
