"""Hyperparameter sweeps without a sweep server: a YAML file -> numbered override sets -> a SLURM job array.

A sweep file names a base recipe and the dotted ``section.key`` overrides to vary (a grid, random choices,
or both); task N of ``sbatch --array`` trains override set N into ``<output_root>/<N>``. The plan is a pure
function of the file (random choices come from its seed), so every array task, a requeued task and
``skinlesion sweep plan`` all compute the same list without talking to each other. Every override set is
validated through `load_config` when the plan is made, so a value the config rejects fails on the login
node, not in task 7 an hour later; an array task (`sweep args`) validates only its own. A sweep is refused
before it is expanded if it has more tasks than SLURM takes in one array (MaxArraySize, 1001 by default).
Paths and values may not hold control characters: a newline in one would become an extra argument on the
cluster (`sweep args --null` separates arguments with NUL bytes as a second line of defence). Format and
defaults: docs/training.md, "Sweeps".
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import json
import math
import random
import re
import shlex
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# _Loader: values parse exactly as overrides do
from skinlesion.config import Config, DuplicateKey, _Loader, control_character, load_config
from skinlesion.errors import UserError
from skinlesion.files import atomic_write

FIELDS = ("name", "base", "output_root", "seed", "max_parallel", "fixed", "grid", "random")
# Set by the sweep for every task: the task's folder, and the W&B group and run name.
RESERVED = ("train.output_dir", "wandb.group", "wandb.name")
PLAN_FILE = "sweep.json"  # written into output_root by `sweep args`, read by `sweep summarize`
# SLURM's default MaxArraySize: an array holds tasks 0 to MaxArraySize - 1. A bigger sweep is several sweep files.
MAX_TASKS = 1001


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: `tasks[i]` is task i's overrides (``key=value``), `fixed` applies to all."""

    file: Path
    name: str
    base: Path
    output_root: Path
    seed: int
    max_parallel: int
    fixed: tuple[str, ...]
    tasks: tuple[tuple[str, ...], ...]

    def task_dir(self, task: int) -> Path:
        return self.output_root / str(task)

    def train_args(self, task: int) -> list[str]:
        """The base config then every override for `task`: what `skinlesion train --config` takes."""
        if not 0 <= task < len(self.tasks):
            raise UserError(f"{self.file}: task {task} does not exist; the sweep has tasks 0-{len(self.tasks) - 1}")
        own = [f"train.output_dir={self.task_dir(task)}", f"wandb.group={self.name}", f"wandb.name={self.name}-{task}"]
        return [str(self.base), *self.fixed, *self.tasks[task], *own]

    def sbatch_line(self) -> str:
        last = len(self.tasks) - 1
        array = f"--array=0-{last}%{min(self.max_parallel, len(self.tasks))}"
        return shlex.join(["sbatch", array, "slurm/sweep.sbatch", str(self.file)])

    def plan(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": str(self.file),
            "base": str(self.base),
            "seed": self.seed,
            "fixed": list(self.fixed),
            "tasks": [list(t) for t in self.tasks],
        }

    def check_recorded(self) -> None:
        """Refuse an output_root whose sweep.json holds another plan under this name. Task N resumes from the
        checkpoints in <output_root>/N, so a changed grid would silently continue old runs with new settings."""
        path = self.output_root / PLAN_FILE
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # none yet (or unreadable: record() rewrites it)
        if not isinstance(old, dict):
            return
        mine = self.plan()
        if [old.get(k) for k in ("fixed", "tasks")] != [mine[k] for k in ("fixed", "tasks")]:
            raise UserError(
                f"{self.output_root} holds a sweep with another plan ({path}); its task folders would resume "
                f"with this file's settings. Give the changed sweep a new 'name' (or 'output_root')"
            )

    def record(self) -> Path:
        """Write the plan to ``<output_root>/sweep.json`` (atomically; every task writes the same bytes), so that
        `summarize` knows the overrides of every task, including those that never started."""
        root = self.output_root
        self.check_recorded()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{self.file}: output_root {root} cannot be created ({exc.strerror or exc})") from exc
        text, path = json.dumps(self.plan(), indent=1) + "\n", root / PLAN_FILE
        with contextlib.suppress(OSError):
            if path.read_text(encoding="utf-8") == text:
                return path  # the usual case: an earlier task wrote it
        try:
            return atomic_write(path, text)
        except OSError as exc:  # tasks starting together on hosts with equal PIDs can race for the temporary name
            print(f"warning: could not write {path} ({exc.strerror or exc})", file=sys.stderr)
            return path


def dotted_keys() -> list[str]:
    """Every ``section.key`` the training config accepts."""
    sections = typing.get_type_hints(Config)
    return [f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls)]


def load_sweep(path: Path, check: int | None = None) -> Sweep:
    """Read, expand and validate a sweep file; any fault is a one-line `UserError` naming the file and key.

    Every task's config is validated, or only task `check`'s when given (an array task needs its own; plan has
    checked them all, and a thousand validations would cost each task seconds)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist; see configs/sweeps/ for an example")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except DuplicateKey as exc:
        raise UserError(f"{path}: {exc}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path} is not a valid YAML sweep file: {' '.join(str(exc).split())}") from None
    except OSError as exc:
        raise UserError(f"cannot read sweep file {path} ({exc.strerror or exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a sweep file is a mapping with keys {', '.join(FIELDS)}")
    for key in raw:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(FIELDS)}"
            raise UserError(f"{path}: unknown key {key!r} ({hint})")

    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"{path}: 'name' must be a folder name (letters, digits, . _ -), got {name!r}")
    if not isinstance(raw.get("base"), str) or not raw["base"]:
        raise UserError(f"{path}: 'base' must name the base recipe, e.g. base: configs/smoke.yaml")
    _printable(path, "base", raw["base"])
    base = Path(raw["base"])
    if not base.is_file():
        raise UserError(f"{path}: base config {base} does not exist (paths are relative to where you run from)")
    output_root = raw.get("output_root", f"runs/{name}")
    if not isinstance(output_root, str) or not output_root:
        raise UserError(f"{path}: 'output_root' must be a folder path, got {output_root!r}")
    _printable(path, "output_root", output_root)
    seed, max_parallel = raw.get("seed", 0), raw.get("max_parallel", 4)
    for key, value, low in (("seed", seed, 0), ("max_parallel", max_parallel, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"{path}: {key!r} must be an integer >= {low}, got {value!r}")

    fixed = [f"{k}={_text(path, k, v)}" for k, v in _mapping(path, "fixed", raw.get("fixed")).items()]
    grid = {k: _values(path, f"grid key {k!r}", v) for k, v in _mapping(path, "grid", raw.get("grid")).items()}
    draws, choices = _random_section(path, raw.get("random"))
    sets = {"fixed": {f.split("=")[0] for f in fixed}, "grid": set(grid), "random": set(choices)}
    for a, b in itertools.combinations(sets, 2):
        if sets[a] & sets[b]:
            raise UserError(f"{path}: key {sorted(sets[a] & sets[b])[0]!r} is in both {a!r} and {b!r}; keep one")
    if not grid and not choices:
        raise UserError(f"{path}: nothing to sweep; give 'grid' (key: [values]) and/or 'random' choices")
    count = math.prod(len(v) for v in grid.values()) * (draws if choices else 1)  # before expanding any of them
    if count > MAX_TASKS:
        sizes = " x ".join([*(str(len(v)) for v in grid.values()), *([f"{draws} samples"] if choices else [])])
        limit = f"more than a SLURM job array takes (MaxArraySize, {MAX_TASKS} by default)"
        raise UserError(f"{path}: {count} tasks ({sizes}) is {limit}; shrink the grid or samples, or split the sweep")

    rng = random.Random(seed)
    points = list(itertools.product(*grid.values())) if grid else [()]
    tasks = []
    for point in points:
        for _ in range(draws if choices else 1):
            chosen = dict(zip(grid, point, strict=True)) | {k: rng.choice(v) for k, v in choices.items()}
            tasks.append(tuple(f"{k}={_text(path, k, v)}" for k, v in chosen.items()))

    sweep = Sweep(path, name, base, Path(output_root), seed, max_parallel, tuple(fixed), tuple(tasks))
    checked = range(len(tasks)) if check is None else [t for t in (check,) if 0 <= t < len(tasks)]
    for task in checked:
        args = sweep.train_args(task)
        try:
            load_config(Path(args[0]), args[1:])
        except UserError as exc:
            raise UserError(f"{path}: task {task} ({' '.join(tasks[task]) or 'fixed keys'}): {exc}") from None
    return sweep


def _mapping(path: Path, field: str, section: Any) -> dict[str, Any]:
    """A ``dotted.key: value`` section of the sweep file, its keys checked against the config."""
    section = section or {}
    if not isinstance(section, dict):
        raise UserError(f"{path}: {field!r} must be a mapping of dotted config keys, e.g. train.lr: ...")
    for key in section:
        _check_key(path, field, key)
    return section


def _check_key(path: Path, field: str, key: Any) -> None:
    known = dotted_keys()
    if not isinstance(key, str) or key not in known:
        what = "not a dotted config key (section.key)" if "." not in str(key) else "not a config key"
        close = [k for k in known if k.endswith(f".{key}")]  # 'lr' means 'train.lr'
        close += difflib.get_close_matches(str(key), known, n=3, cutoff=0.6)
        close.sort(key=lambda k: not (str(key).startswith(k) or k.startswith(str(key))))  # 'lr_rate' means 'lr'
        hint = f"; did you mean {close[0]!r}?" if close else "; see docs/training.md for the keys"
        raise UserError(f"{path}: {field} key {key!r} is {what}{hint}")
    if key in RESERVED:
        raise UserError(f"{path}: {field} key {key!r} is set by the sweep for each task; remove it")


def _values(path: Path, what: str, values: Any) -> list[Any]:
    if not isinstance(values, list):
        raise UserError(f"{path}: {what} must be a list of values, got {values!r}")
    if not values:
        raise UserError(f"{path}: {what} has an empty list of values")
    seen: set[str] = set()
    for value in values:
        text = json.dumps(value)
        if text in seen:
            raise UserError(f"{path}: {what} lists {value!r} more than once")
        seen.add(text)
    return values


def _random_section(path: Path, section: Any) -> tuple[int, dict[str, list[Any]]]:
    """``random: {samples: N, choices: {key: [values]}}`` -> (N, choices); (0, {}) when absent."""
    if section is None:
        return 0, {}
    if not isinstance(section, dict) or set(section) - {"samples", "choices"}:
        raise UserError(f"{path}: 'random' must be a mapping with 'samples' (an integer) and 'choices' (key: [values])")
    samples = section.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise UserError(f"{path}: random 'samples' must be an integer >= 1, got {samples!r}")
    choices = _mapping(path, "random choices", section.get("choices"))
    if not choices:
        raise UserError(f"{path}: random 'choices' is empty; give key: [values]")
    return samples, {k: _values(path, f"random choice {k!r}", v) for k, v in choices.items()}


def _text(path: Path, key: str, value: Any) -> str:
    """The override text that `load_config` parses back to `value` (strings it would read otherwise are quoted)."""
    if isinstance(value, dict | list):
        raise UserError(f"{path}: {key!r} takes a single value, got {value!r}")
    if value is None or isinstance(value, bool):
        text = {None: "null", True: "true", False: "false"}[value]
    else:
        text = repr(value) if isinstance(value, float) else str(value)
    _printable(path, f"the value of {key!r}", text)
    parsed = yaml.load(text, Loader=_Loader) if text.strip() else ""
    if isinstance(value, str) and parsed != value:
        text = json.dumps(value)  # a JSON string is a YAML double-quoted scalar
    return text


def _printable(path: Path, what: str, text: str) -> None:
    """Refuse a control character (newline, tab, NUL...): each task's arguments travel to the cluster as text."""
    char = control_character(text)
    if char is not None:
        raise UserError(f"{path}: {what} holds a control character ({char!r}): {text!r}; remove it")


def plan_command(path: Path) -> int:
    """`skinlesion sweep plan FILE`: the numbered override sets and the line that runs them."""
    sweep = load_sweep(path)
    sweep.check_recorded()
    n = len(sweep.tasks)
    print(f"sweep {sweep.name}: {n} task(s) of {sweep.base} into {sweep.output_root}/<task> (W&B group {sweep.name})")
    if sweep.fixed:
        print(f"every task: {' '.join(sweep.fixed)}")
    width = len(str(n - 1))
    for task, overrides in enumerate(sweep.tasks):
        print(f"  {task:>{width}}  {' '.join(overrides)}")
    print(f"run them (logs in logs/):\n  mkdir -p logs && {sweep.sbatch_line()}")
    print(f"then: skinlesion sweep summarize {shlex.quote(str(sweep.output_root))}")
    return 0


def args_command(path: Path, task: int, null: bool = False) -> int:
    """`skinlesion sweep args FILE --task N [--null]`: one training argument a line (config, then overrides), or
    each ended by a NUL byte (what slurm/sweep.sbatch reads); also records the plan in ``<output_root>/sweep.json``
    for `summarize`."""
    sweep = load_sweep(path, check=task)
    args = sweep.train_args(task)
    sweep.record()
    sys.stdout.write("".join(f"{arg}\0" for arg in args) if null else "\n".join(args) + "\n")
    return 0
