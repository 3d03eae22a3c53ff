"""The classifier: a torchvision ResNet with its fc replaced by a head of the dataset's classes (7 for HAM10000).

Everything that reads weights a user hands over goes through `load_weights`, which uses
``torch.load(weights_only=True)``: a file whose unpickling would run code is refused, not executed.

A model is only usable with the facts it was trained with (`ModelFacts`: architecture, classes, input
size); preprocessing a 64-px model at 224 px gives confident nonsense. best.pt stores them as fields;
model.pt stays a plain state_dict that torchvision's ``load_state_dict`` takes, and carries them in
``state_dict._metadata["skinlesion"]``, the per-module metadata dict that ``torch.save`` and
``torch.load(weights_only=True)`` preserve and ``load_state_dict`` ignores for unknown names. So a
model.pt copied anywhere still knows its input size; a foreign state_dict needs ``--image-size``.
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
from skinlesion.facts import ARCHS, FACTS_KEY, ModelFacts
from skinlesion.labels import CLASSES, NUM_CLASSES

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
    malignant: tuple[str, ...] = ()  # the classes whose probabilities add up to "malignant"
    shard_size: int | None = None  # prepare's --image-size of its training shards (None: not recorded)
    jpeg_quality: int | None = None  # the JPEG quality of those shard images (None: not recorded)


def build_model(
    arch: str = "resnet50",
    pretrained: str = "none",
    num_classes: int = NUM_CLASSES,
    classes: tuple[str, ...] | None = None,
) -> nn.Module:
    """Build `arch` with a `num_classes` head; `pretrained` is none | imagenet | a state_dict path.

    ImageNet weights initialise the backbone only (their 1000-class fc is dropped); a local file is read by
    `load_pretrained`, which maps a skinlesion checkpoint's head rows onto `classes` where the codes match.
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
    load_pretrained(model, arch, Path(pretrained), classes)
    return model


def load_pretrained(model: nn.Module, arch: str, path: Path, classes: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Initialise `model` (a torchvision `arch`) from the file `model.pretrained` names, or say in one line
    why the file does not fit: PyTorch's own error is one "size mismatch" line per tensor.

    Takes a plain state_dict (a backbone, or a whole model: its fc when it has this head's shape), skinlesion's
    model.pt, and skinlesion's best.pt (its backbone, and its head too when its classes are this run's).
    When a skinlesion checkpoint's classes differ from `classes` (HAM10000's 7 -> ISIC 2019's 8), the head is
    new except the rows of classes both share, which are copied (bcc, bkl, df, mel, nv, vasc). Returns the
    classes whose head rows came from the file.
    """
    obj = load_weights(path)
    recorded = getattr(obj, "_metadata", None) or {}
    saved = recorded.get(FACTS_KEY, {}).get("classes") if isinstance(recorded.get(FACTS_KEY), dict) else None
    if isinstance(obj.get("model"), dict) and "arch" in obj:  # skinlesion's best.pt
        saved_arch = obj.get("arch")
        if saved_arch != arch:
            raise UserError(
                f"model.pretrained={path} is a skinlesion best.pt of arch={saved_arch!r}, and model.name is {arch}: "
                f"set model.name={saved_arch}, or pass a {arch} checkpoint"
            )
        state = strip_wrapper_prefixes(obj["model"])
        saved = obj.get("classes")
    else:
        nested = [k for k, v in obj.items() if isinstance(v, dict)]
        if nested:  # Lightning's {"state_dict": ...}, a {"model_state_dict": ..., "optimizer": ...} bundle
            raise UserError(
                f"model.pretrained={path} is a training checkpoint with entries {sorted(obj)[:6]}, not a state_dict; "
                f"save the model's weights alone (e.g. torch.save(ckpt[{nested[0]!r}], 'weights.pt')) and pass that"
            )
        state = strip_wrapper_prefixes(obj)
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.pretrained={path} does not hold a state_dict of tensors")
    head: dict[str, torch.Tensor] = {}
    saved = tuple(saved) if isinstance(saved, list | tuple) else None
    if saved is not None and saved != tuple(classes or CLASSES):  # another label set: backbone, mapped head rows
        head = {k: state.pop(k) for k in ("fc.weight", "fc.bias") if k in state}
    own = model.state_dict()
    if state.get("fc.weight") is not None and state["fc.weight"].shape != own["fc.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # ImageNet's 1000 classes: head dropped
    _check_fit(state, own, arch, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise UserError(
            f"model.pretrained={path} does not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            f"pass a state_dict saved from torchvision's {arch}"
        )
    if saved is not None and saved == tuple(classes or CLASSES):
        return saved
    shared = tuple(c for c in classes or () if c in (saved or ()) and len(head) == 2)
    with torch.no_grad():
        for c in shared:
            i, j = classes.index(c), saved.index(c)
            if head["fc.weight"].shape[1:] == model.fc.weight.shape[1:]:
                model.fc.weight[i] = head["fc.weight"][j]
                model.fc.bias[i] = head["fc.bias"][j]
    return shared


def init_from(model: nn.Module, arch: str, path: Path, classes: tuple[str, ...]) -> tuple[str, ...]:
    """`train.init_from`: fine-tune from another skinlesion checkpoint, whatever its classes (HAM10000's 7 ->
    ISIC 2019's 8). Its backbone is loaded; the head is new, except the rows of the classes both share.
    Returns those classes. A file without skinlesion's facts is refused: use model.pretrained for it."""
    obj = load_weights(path)
    recorded = getattr(obj, "_metadata", None) or {}
    if not (isinstance(obj.get("model"), dict) and "classes" in obj) and not isinstance(recorded.get(FACTS_KEY), dict):
        raise UserError(
            f"train.init_from={path} is not a skinlesion checkpoint (no recorded classes): pass the best.pt or "
            "model.pt of a skinlesion run, or use model.pretrained for other weights"
        )
    return load_pretrained(model, arch, path, classes)


def _check_fit(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], arch: str, path: Path) -> None:
    """Refuse weights of another architecture or input (a 1-channel conv1) before load_state_dict lists them all."""
    try:
        seems = infer_arch(state, path)
    except UserError:
        seems = None
    if seems is not None and seems != arch:
        raise UserError(
            f"model.pretrained={path} holds {seems} weights, and model.name is {arch}: set model.name={seems}, "
            f"or pass {arch} weights"
        )
    mismatch = _shape_mismatch(state, own, seems)
    if mismatch:
        raise UserError(
            f"model.pretrained={path} does not fit {arch}: {mismatch}. "
            f"Pass a state_dict saved from torchvision's {arch} with 3 input channels"
        )


def _shape_mismatch(state: dict[str, Any], own: dict[str, torch.Tensor], seems: str | None) -> str | None:
    """The first tensors whose shapes differ from `own`'s and what the weights look like, or None when all fit."""
    wrong = [k for k, v in state.items() if k in own and getattr(v, "shape", None) != own[k].shape]
    if not wrong:
        return None
    first = ", ".join(f"{k} {list(getattr(state[k], 'shape', []))} (not {list(own[k].shape)})" for k in wrong[:2])
    more = f" and {len(wrong) - 2} more" if len(wrong) > 2 else ""
    conv1 = state.get("conv1.weight")
    channels = conv1.shape[1] if isinstance(conv1, torch.Tensor) and conv1.ndim == 4 else None
    looks = f"a {seems}" if seems else "a network other than a torchvision ResNet"
    if channels not in (None, 3):
        looks += f" for {channels}-channel images (skinlesion feeds RGB)"
    return f"{first}{more}; it looks like {looks}"


def load_weights(path: Path) -> dict[str, Any]:
    """Read a checkpoint file safely; return its state_dict, or the dict saved by training (best.pt).

    Only tensors and plain containers are accepted (``weights_only=True``): pickled code is refused.
    Anything else (a text file, a truncated download) is one clear error, never a traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    with path.open("rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # torch.save's zip container, or its legacy pickle
        raise UserError(f"{path} is not a PyTorch checkpoint (not written by torch.save); pass model.pt or best.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"refusing to load {path}: it holds pickled objects beyond tensors and plain containers "
            f"(loading it could run code). Only load checkpoints written by skinlesion or plain state_dicts. "
            f"Detail: {str(exc).splitlines()[0]}"
        ) from exc
    except Exception as exc:  # a damaged zip or pickle surfaces as RuntimeError, EOFError, KeyError, ...
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}); was it fully written?"
        ) from exc
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


def infer_arch(state: dict[str, Any], source: Path | str = "the state_dict") -> str:
    """Name the torchvision ResNet a state_dict belongs to, from its block counts and block type."""
    blocks = []
    for stage in range(1, 5):
        indices = {k.split(".")[1] for k in state if k.startswith(f"layer{stage}.")}
        blocks.append(len(indices))
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    arch = _BLOCKS.get((tuple(blocks), bottleneck))
    if arch is None:
        raise UserError(f"{source} is not a torchvision ResNet state_dict (blocks per stage {blocks})")
    return arch


def load_for_inference(path: Path, image_size: int | None = None) -> LoadedModel:
    """Load model.pt (a plain state_dict) or best.pt (training's dict with metadata) for inference.

    Nothing is guessed: the architecture, classes and input size come from the file (best.pt's fields,
    or the facts model.pt carries in its ``_metadata``), every one validated, or for a foreign plain
    state_dict the input size from `image_size` (``--image-size``) and the architecture from its keys.
    """
    path = Path(path)
    obj = load_weights(path)
    if isinstance(obj.get("model"), dict):  # best.pt: {"model": state_dict, "arch", "classes", "image_size", ...}
        missing = [k for k in ("arch", "classes", "image_size") if k not in obj]
        if missing:
            raise UserError(f"{path} has a 'model' entry but lacks {missing}; it was not written by skinlesion")
        facts = ModelFacts.check(obj, path)
        state = strip_wrapper_prefixes(obj["model"])
    else:
        state = strip_wrapper_prefixes(obj)
        recorded = getattr(obj, "_metadata", None) or {}
        if isinstance(recorded.get(FACTS_KEY), dict):
            facts = ModelFacts.check(recorded[FACTS_KEY], path)
        elif image_size is None:
            raise UserError(
                f"{path} is a plain state_dict that does not record its input size: pass --image-size N "
                f"(the data.image_size it was trained at), or use the best.pt / model.pt written by skinlesion train"
            )
        else:
            plain = {"arch": infer_arch(state, path), "classes": list(CLASSES), "image_size": image_size}
            facts = ModelFacts.check(plain, path)
    if image_size is not None and image_size != facts.image_size:
        raise UserError(
            f"--image-size {image_size} contradicts {path}, which was trained at {facts.image_size} px; "
            f"drop --image-size"
        )
    _check_state(state, facts, path)
    model = getattr(models, facts.arch)(num_classes=len(facts.classes))
    mismatch = _shape_mismatch(state, model.state_dict(), facts.arch)
    if mismatch:  # load_state_dict would say so in one line per tensor, after a first line that says nothing
        raise UserError(f"{path} does not load into {facts.arch}: {mismatch}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path} does not load into {facts.arch}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return LoadedModel(
        model=model,
        arch=facts.arch,
        classes=facts.classes,
        image_size=facts.image_size,
        source=path,
        malignant=tuple(facts.malignant or ()),
        shard_size=facts.shard_size,
        jpeg_quality=facts.jpeg_quality,
    )


def _check_state(state: dict[str, Any], facts: ModelFacts, path: Path) -> None:
    """The weights must be tensors of the declared architecture with a head of the declared classes."""
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state_dict of tensors")
    arch = infer_arch(state, path)
    if arch != facts.arch:
        raise UserError(f"{path} says arch={facts.arch!r} but its weights are a {arch}; the file is inconsistent")
    head = state.get("fc.weight")
    if head is None or head.ndim != 2 or head.shape[0] != len(facts.classes):
        outputs = None if head is None else tuple(head.shape)
        raise UserError(
            f"{path} has a classifier head of shape {outputs}, not {len(facts.classes)} outputs "
            f"({', '.join(facts.classes)}); it is not a skinlesion model"
        )
