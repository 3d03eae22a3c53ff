"""The typed training config: a YAML recipe plus dotted ``key=value`` overrides -> validated dataclasses.

One strict schema instead of a free-form dict, because a typo in a recipe (``train.lr_rate``) that is
silently ignored costs a whole cluster run. Every key is checked against the dataclasses below: an
unknown key, a value of the wrong type or a value outside its allowed set is a `UserError` naming the
key (and the closest valid key, when the name looks mistyped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from skinlesion.control_chars import control_character
from skinlesion.errors import UserError
from skinlesion.files import atomic_write


@dataclass
class DataConfig:
    shards: Path = Path("shards")  # folder written by `skinlesion prepare` (holds manifest.json)
    image_size: int = 224  # training crop / eval centre-crop side, px
    batch_size: int = 64  # per process
    eval_batch_size: int = 128  # per process, validation
    num_workers: int | str = "auto"  # loader processes per training process; auto: its share of the cores, less one
    shuffle_buffer: int = 1000  # samples held for the in-stream shuffle
    augment: str = "auto"  # where per-pixel augmentation runs: auto (device on CUDA, else cpu) | device | cpu
    # where training JPEGs are decoded: cpu (loader workers) | device (nvJPEG; needs augment on the device) | auto
    # (device on CUDA when torchvision's GPU decoder works there); cpu until a GPU run has measured device
    decode: str = "cpu"


@dataclass
class ModelConfig:
    name: str = "resnet50"  # any torchvision ResNet
    pretrained: str = "none"  # none | imagenet | path to a state_dict file


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 1e-3  # peak learning rate, reached after warmup
    optimizer: str = "adamw"  # adamw | adam | sgd
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 1.0  # linear warmup, then cosine decay to min_lr_ratio * lr (per step)
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.1
    loss: str = "ce"  # ce | weighted_ce | logit_adjusted | focal (see skinlesion/losses.py and docs/training.md)
    loss_tau: float = 1.0  # logit_adjusted: scale of the log-prior shift
    focal_gamma: float = 2.0  # focal: the focusing exponent
    ema_decay: float = 0.0  # exponential moving average of the weights (e.g. 0.9998); 0 = off
    ema_every_steps: int = 1  # optimizer steps between EMA updates
    mixup_alpha: float = 0.0  # MixUp's Beta(alpha, alpha) mixing weight; 0 = no MixUp
    cutmix_alpha: float = 0.0  # CutMix's Beta(alpha, alpha) box area; 0 = no CutMix
    mix_prob: float = 0.0  # share of batches that get MixUp or CutMix (one of the two, at random); 0 = off
    backbone_lr_mult: float = 1.0  # lr multiplier for everything but the fc head (e.g. 0.1 when fine-tuning)
    freeze_backbone_epochs: int = 0  # first N epochs train the fc head only, BatchNorm statistics frozen
    init_from: str = (
        "none"  # a skinlesion best.pt/model.pt to fine-tune from: its backbone, head rows of shared classes
    )
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: str = "auto"  # auto (launcher's choice, else bf16 on a bf16 GPU) | no | bf16 | fp16
    compile: bool = False  # torch.compile the model (from its first epoch with an unfrozen backbone)
    compile_backend: str = "inductor"  # torch.compile's backend: inductor | aot_eager | eager (the last two debug)
    reference_batch: int = 0  # the global batch train.lr and ema_decay are meant for; others are scaled. 0 = off
    seed: int = 0
    output_dir: Path = Path("runs/ham10000")
    resume: str = "auto"  # auto | never | path to a checkpoint folder
    checkpoint_every_steps: int = 0  # extra mid-epoch checkpoints; 0 = only at epoch ends
    keep_checkpoints: int = 3  # newest K complete checkpoints are kept
    log_every_steps: int = 10
    dist_timeout_s: int = 1800  # process-group timeout: a dead rank fails the others instead of hanging them


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    project: str = "skinlesion"
    entity: str | None = None
    name: str | None = None  # run name; default: the output folder's name
    group: str | None = None  # W&B run group (a sweep sets it to the sweep's name); none by default


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-friendly dict (paths as strings)."""
        return {
            name: {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(section).items()}
            for name, section in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        }


IMAGE_SIZE_RANGE = (16, 1024)  # input sizes a model may be trained and used at (checked in checkpoints too)

CHOICES: dict[str, tuple[str, ...]] = {
    "data.augment": ("auto", "device", "cpu"),
    "data.decode": ("auto", "device", "cpu"),
    "train.optimizer": ("adamw", "adam", "sgd"),
    "train.loss": ("ce", "weighted_ce", "logit_adjusted", "focal"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "wandb.mode": ("auto", "online", "offline", "disabled"),
}
# Keys whose value must be > 0 (or >= 0 for the second set).
POSITIVE = {"data.image_size", "data.batch_size", "data.eval_batch_size", "data.shuffle_buffer", "train.epochs"}
POSITIVE |= {"train.lr", "train.grad_accum", "train.keep_checkpoints", "train.log_every_steps", "train.dist_timeout_s"}
NON_NEGATIVE = {"data.num_workers", "train.weight_decay", "train.warmup_epochs", "train.grad_clip", "train.seed"}
NON_NEGATIVE |= {"train.checkpoint_every_steps", "train.momentum", "train.min_lr_ratio", "train.loss_tau"}
NON_NEGATIVE |= {"train.focal_gamma", "train.label_smoothing", "train.ema_decay"}
NON_NEGATIVE |= {"train.mixup_alpha", "train.cutmix_alpha", "train.mix_prob", "train.backbone_lr_mult"}
NON_NEGATIVE |= {"train.freeze_backbone_epochs", "train.reference_batch"}
AUTO = {"data.num_workers"}  # a count, or "auto": checked and resolved on the machine that trains (data.workers)
POSITIVE |= {"train.ema_every_steps"}
# Integers past int32 overflow torch and numpy (train.seed: numpy's seeds stop at 2**32 - 1); "*" is every key.
INT_LIMIT = {"*": 2**31 - 1, "train.seed": 2**32 - 1}


class DuplicateKey(yaml.YAMLError):
    """A mapping names one key twice; the message says which and on what lines."""


class _Loader(yaml.SafeLoader):
    """YAML's safe loader with YAML 1.2 booleans: only true/false are booleans, so ``mixed_precision=no``
    stays the string "no" instead of becoming False (YAML 1.1 also reads yes/no/on/off as booleans).

    It also refuses a key given twice in one mapping: plain YAML keeps the last silently, so a recipe with two
    ``train:`` sections would lose the first, and a sweep with two ``grid:`` sections would run half its grid.
    Configs and sweep files both load through it. Keys merged in with ``<<:`` may still be overridden."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                with contextlib.suppress(TypeError):  # an unhashable key: the base class says so
                    if key in seen:
                        raise DuplicateKey(f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one")
                    seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_config(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read the YAML recipe at `path` (None: defaults only), apply ``section.key=value`` overrides, validate.

    Override values are parsed as YAML scalars, so ``train.lr=3e-4`` is a float, ``train.compile=true``
    a bool and ``wandb.name=null`` None.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; pass e.g. --config configs/smoke.yaml")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
        except UnicodeDecodeError:
            raise UserError(
                f"{path} is not a text file (not UTF-8); pass a YAML recipe, e.g. configs/smoke.yaml"
            ) from None
        except DuplicateKey as exc:
            raise UserError(f"{path}: {exc}") from None
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer of over 4300 digits
            raise UserError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from exc
        except OSError as exc:
            raise UserError(f"cannot read config file {path} ({exc.strerror or exc})") from exc
        if not isinstance(raw, dict):
            raise UserError(f"{path} must hold a mapping of sections (data, model, train, wandb)")
    for item in overrides:
        if (char := control_character(item)) is not None:  # YAML would fold a newline away, a shell would not
            raise UserError(f"override {item!r} holds a control character ({char!r}); remove it")
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"override {item!r} is not of the form section.key=value (e.g. train.epochs=3)")
        section, _, name = key.strip().partition(".")
        try:
            value = yaml.load(text, Loader=_Loader) if text.strip() else ""
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer of over 4300 digits
            raise UserError(f"override {item!r}: cannot parse the value ({' '.join(str(exc).split())})") from None
        current = raw.setdefault(section, {})
        if not isinstance(current, dict):
            raise UserError(f"override {item!r}: section {section!r} is not a mapping in the recipe")
        current[name] = value
    return _build(raw, source=str(path) if path else "defaults")


def _build(raw: dict[str, Any], source: str) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in sections:
            raise UserError(f"{source}: unknown config section {section!r}{_suggest(section, sections)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UserError(f"{source}: section {section!r} must be a mapping of keys, got {values!r}")
        cls = typing.get_type_hints(Config)[section]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in hints:
                known = [f"{section}.{k}" for k in hints]
                raise UserError(f"{source}: unknown config key {dotted!r}{_suggest(dotted, known)}")
            kwargs[key] = _coerce(dotted, value, hints[key])
        built[section] = cls(**kwargs)
    cfg = Config(**built)
    _check_values(cfg)
    return cfg


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's type; accept ints for floats and strings for paths."""
    if key in AUTO:
        if value == "auto":
            return value
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"config key {key!r} must be an integer or auto, got {value!r}")
        hint = int
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, str) and value != "",
    }[hint]
    if not ok:
        raise UserError(f"config key {key!r} must be {_type_name(hint)}, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise UserError(f"config key {key!r} must be a finite number, got {value!r}")
    if hint in (str, Path) and (char := control_character(value)) is not None:
        raise UserError(f"config key {key!r} holds a control character ({char!r}): {value!r}; remove it")
    if hint is int and not abs(value) <= (limit := INT_LIMIT.get(key, INT_LIMIT["*"])):
        shown = value if value.bit_length() < 128 else "a number of over 38 digits"
        raise UserError(f"config key {key!r} is out of range: {shown} (at most {limit})")
    if hint is Path:
        return Path(value)
    return hint(value)


def _check_values(cfg: Config) -> None:
    for key in POSITIVE | NON_NEGATIVE | set(CHOICES):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if key in AUTO and value == "auto":
            continue
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(f"config key {key!r} is {value!r}; choose one of {', '.join(CHOICES[key])}")
        if key in POSITIVE and not value > 0:
            raise UserError(f"config key {key!r} must be > 0, got {value!r}")
        if key in NON_NEGATIVE and not value >= 0:
            raise UserError(f"config key {key!r} must be >= 0, got {value!r}")
    if not cfg.train.ema_decay < 1:
        raise UserError(f"config key 'train.ema_decay' must be below 1 (0 = off), got {cfg.train.ema_decay}")
    if not cfg.train.label_smoothing < 1:
        raise UserError(f"config key 'train.label_smoothing' must be below 1, got {cfg.train.label_smoothing}")
    if not cfg.train.mix_prob <= 1:
        raise UserError(f"config key 'train.mix_prob' is a probability: from 0 to 1, got {cfg.train.mix_prob}")
    if cfg.train.mix_prob > 0 and cfg.train.mixup_alpha == 0 and cfg.train.cutmix_alpha == 0:
        raise UserError(
            f"train.mix_prob={cfg.train.mix_prob} mixes nothing: set train.mixup_alpha and/or "
            "train.cutmix_alpha (e.g. 0.2 and 1.0), or train.mix_prob=0"
        )
    if cfg.train.freeze_backbone_epochs >= cfg.train.epochs:
        raise UserError(
            f"train.freeze_backbone_epochs={cfg.train.freeze_backbone_epochs} leaves no epoch of the "
            f"{cfg.train.epochs} (train.epochs) to train the backbone; lower it"
        )
    if cfg.data.decode == "device" and cfg.data.augment == "cpu":  # caught before any folder is made or locked
        raise UserError("data.decode=device needs data.augment=device (or auto): set one of them, e.g. data.decode=cpu")
    low, high = IMAGE_SIZE_RANGE
    if not low <= cfg.data.image_size <= high:
        raise UserError(f"config key 'data.image_size' must be from {low} to {high} px, got {cfg.data.image_size}")
    if cfg.train.init_from != "none" and cfg.model.pretrained != "none":
        raise UserError(
            f"train.init_from={cfg.train.init_from} and model.pretrained={cfg.model.pretrained} both initialise "
            "the model: set one of them (init_from for a skinlesion checkpoint, pretrained for other weights)"
        )
    if cfg.train.init_from != "none" and not Path(cfg.train.init_from).is_file():
        raise UserError(f"train.init_from={cfg.train.init_from}: no such file; pass a skinlesion best.pt or model.pt")
    if cfg.train.resume not in ("auto", "never") and not Path(cfg.train.resume).is_dir():
        raise UserError(
            f"train.resume={cfg.train.resume!r}: no such checkpoint folder; use auto, never, "
            f"or a folder under <output_dir>/checkpoints/"
        )


def _suggest(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    close.sort(key=lambda k: not (name.startswith(k) or k.startswith(name)))  # 'lr_rate' means 'lr'
    choices = ", ".join(sorted(known))
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {choices})"


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}[hint]


def save_config(cfg: Config, path: Path, runtime: dict[str, Any]) -> None:
    """Write the resolved config plus a ``runtime`` section (world size, device, versions) atomically."""
    atomic_write(path, yaml.safe_dump(cfg.to_dict() | {"runtime": runtime}, sort_keys=False))
