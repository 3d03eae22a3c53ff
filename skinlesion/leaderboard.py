"""`skinlesion sweep summarize`: one row per run of a sweep folder, best validation score first.

A run's score is the metric its best.pt was kept by (`metrics.selection`, named in metrics.jsonl's
``best_pt_metric``): validation balanced accuracy, or the malignant class's ROC AUC for a binary dataset (ISIC
2020, the challenge's metric), or the lowest validation loss where that AUC is undefined. A finished run's
score and 95% interval come from its ``model_card.json`` (`skinlesion.card.calibrate` re-evaluates best.pt on
the whole val split at the end of training and bootstraps over lesions or patients, 1000 resamples), so a
winner whose interval overlaps the runner-up's is visibly not a clear winner. A run that has not finished has
no card: its best epoch so far comes from metrics.jsonl, without an interval, and it is listed below the
finished runs, marked. Runs are ranked on one metric, the one most of them were kept by; a run kept by
another (other shards, say) is listed without a rank, noted. Tasks that the plan (``sweep.json``, written by
``sweep args``) lists but that never made a folder are listed as not started.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skinlesion.errors import UserError
from skinlesion.files import atomic_write, read_jsonl
from skinlesion.metrics import LOWER_IS_BETTER
from skinlesion.sweep import PLAN_FILE

RUN_FILES = ("config.yaml", "metrics.jsonl", ".lock", "preempted", "failed", "checkpoints")
CI_SOURCE = "model_card.json: best.pt on the val split, 95% bootstrap interval over lesions (1000 resamples)"
DEFAULT_METRIC = "val_balanced_accuracy"  # runs written before best_pt_metric was recorded
LABELS = {"val_balanced_accuracy": "val balanced accuracy", "val_auc": "val AUC", "val_loss": "val loss"}
CARD_KEYS = {"val_balanced_accuracy": "balanced_accuracy", "val_auc": "auc"}  # model_card.json's validation
OUTPUTS = ("leaderboard.csv", "leaderboard.md", "leaderboard.png")


@dataclass
class Row:
    task: str
    overrides: str
    status: str  # finished | unfinished | failed | not started
    metric: str = DEFAULT_METRIC  # what best.pt was kept by, and the score is
    score: float | None = None  # the best epoch's value of `metric`
    ranked: bool = False
    ci: tuple[float, float] | None = None
    best_epoch: int | None = None
    epochs: str = "-"  # epochs done / planned
    note: str = ""


def summarize(root: Path) -> list[Row]:
    """The rows of the sweep folder `root`: finished runs best first, then the rest (best first), then tasks
    without a score, each group in task order."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass a sweep's output folder, e.g. runs/<sweep>")
    planned = _read_plan(root)
    folders = {p.name: p for p in root.iterdir() if p.is_dir() and any((p / f).exists() for f in RUN_FILES)}
    names = sorted(set(planned) | set(folders), key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    if not names:
        raise UserError(f"{root} holds no runs (no sub-folder with config.yaml or metrics.jsonl, no {PLAN_FILE})")
    labels = planned or _differing_keys({n: folders[n] for n in names})
    rows = [_row(name, root / name, labels.get(name, "")) for name in names]
    metric = leading_metric(rows)
    for row in rows:
        row.ranked = row.status == "finished" and row.score is not None and row.metric == metric
        if row.score is not None and row.metric != metric:
            row.note = "; ".join(n for n in (f"scored by {row.metric}, not {metric}: not ranked", row.note) if n)
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    order = {"finished": 0, "unfinished": 1, "failed": 1, "not started": 2}
    return sorted(rows, key=lambda r: (order[r.status], not r.ranked, r.score is None, sign * (r.score or 0.0)))


def leading_metric(rows: list[Row]) -> str:
    """The metric most scored rows were kept by (the first of equals in task order): the one they are ranked on."""
    counts: dict[str, int] = {}
    for row in rows:
        if row.score is not None:
            counts[row.metric] = counts.get(row.metric, 0) + 1
    return max(counts, key=lambda m: counts[m]) if counts else DEFAULT_METRIC


def _read_plan(root: Path) -> dict[str, str]:
    path = root / PLAN_FILE
    if not path.is_file():
        return {}
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))["tasks"]
        return {str(i): " ".join(overrides) for i, overrides in enumerate(tasks)}
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a sweep plan ({exc}); delete it, or rerun a task to write it again") from None


def _differing_keys(folders: dict[str, Path]) -> dict[str, str]:
    """Without a plan (runs made by `wandb agent`, say): label each run by the config keys that differ."""
    flat = {name: _flat_config(path / "config.yaml") for name, path in folders.items()}
    keys = sorted({k for cfg in flat.values() for k in cfg} - {"train.output_dir", "wandb.name"})
    varying = [k for k in keys if len({json.dumps(cfg.get(k), default=str) for cfg in flat.values()}) > 1]
    return {name: " ".join(f"{k}={cfg.get(k)}" for k in varying if k in cfg) for name, cfg in flat.items()}


def _flat_config(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {
        f"{s}.{k}": v for s, keys in raw.items() if s != "runtime" and isinstance(keys, dict) for k, v in keys.items()
    }


def _row(name: str, run: Path, overrides: str) -> Row:
    row = Row(task=name, overrides=overrides, status="not started")
    if not run.is_dir():
        return row
    history, damage = _metrics(run / "metrics.jsonl")
    planned = _flat_config(run / "config.yaml").get("train.epochs", "?")
    row.epochs = f"{len(history)}/{planned}"
    card = _json(run / "model_card.json")
    chosen = _object((card or {}).get("best_pt_selection"))
    # Only the names `metrics.selection` gives: a hand-edited file's other text is not printed as a metric.
    named = [m["best_pt_metric"] for m in history if m.get("best_pt_metric") in LABELS]
    row.metric = named[-1] if named else chosen["metric"] if chosen.get("metric") in LABELS else row.metric
    scored = [m for m in history if _number(m.get(row.metric))]
    if scored:  # the first of equal epochs, as best.pt keeps
        pick = min if row.metric in LOWER_IS_BETTER else max
        best = pick(scored, key=lambda m: m[row.metric])
        row.score, row.best_epoch = float(best[row.metric]), best.get("epoch")
    if (run / "failed").is_file():
        row.status, row.note = "failed", (run / "failed").read_text(errors="replace").strip()
    elif (run / "preempted").is_file():
        row.status = "unfinished"
        row.note = f"preempted at {(run / 'preempted').read_text(errors='replace').strip()}; resumes when rerun"
    elif card is not None or ((run / "model.pt").is_file() and (run / "eval" / "metrics.json").is_file()):
        row.status = "finished"
    else:
        row.status, row.note = "unfinished", "running, waiting, or stopped (no model.pt yet)"
    validation = _object((card or {}).get("validation"))
    key = CARD_KEYS.get(row.metric)
    value = validation.get(key) if key else None
    if value is None and chosen.get("metric") == row.metric:  # a card written before it held the AUC: no interval
        value = chosen.get("value")
    if row.status == "finished" and _number(value):
        row.score = float(value)
        ci = validation.get(f"{key}_ci95") if key else None
        if isinstance(ci, list) and len(ci) == 2 and all(map(_number, ci)):
            row.ci = (float(ci[0]), float(ci[1]))
    elif row.status == "finished" and row.score is not None:
        row.note = f"no {row.metric} in model_card.json (no val split?): best epoch from metrics.jsonl, no interval"
    elif row.status == "finished":
        row.note = (
            f"no {row.metric} in metrics.jsonl or model_card.json (written by an older skinlesion): "
            "`skinlesion evaluate --split val` on its best.pt rewrites the card"
        )
    row.note = "; ".join(n for n in (row.note, damage) if n)
    return row


def _metrics(path: Path) -> tuple[list[dict[str, Any]], str]:
    """metrics.jsonl's epochs, and a note when it is damaged. A line cut short by a crash is skipped with a
    warning but not repaired: the run may be live, and only its trainer may rewrite the file. A damaged line
    before the last leaves the run without a score from it, noted, rather than stopping the whole table."""
    try:
        return read_jsonl(path, "the run's metrics", repair=False), ""
    except UserError as exc:
        return [], str(exc)


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _number(value: Any) -> bool:
    """A finite int or float, not a bool: a score or an interval's end read from a run's files."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _object(value: Any) -> dict[str, Any]:
    """A part of a card that should be a JSON object; anything else (a hand-edited or damaged card) as empty: the
    row then gets no score from the card and says so, and the table goes on."""
    return value if isinstance(value, dict) else {}


def _fmt(row: Row) -> str:
    if row.score is None:
        return "-"
    return f"{row.score:.3f}" + (f" ({row.ci[0]:.3f}-{row.ci[1]:.3f})" if row.ci else " (no CI)")


def _ranks(rows: list[Row]) -> list[str]:
    return [str(i + 1) if r.ranked else "-" for i, r in enumerate(rows)]


def _label(metric: str) -> str:
    return LABELS.get(metric, metric)


def to_csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "rank",
            "task",
            "status",
            "metric",
            "score",
            "ci95_low",
            "ci95_high",
            "best_epoch",
            "epochs",
            "overrides",
            "note",
        ]
    )
    for rank, r in zip(_ranks(rows), rows, strict=True):
        low, high = r.ci or ("", "")
        writer.writerow(
            [
                rank,
                r.task,
                r.status,
                r.metric,
                "" if r.score is None else r.score,
                low,
                high,
                "" if r.best_epoch is None else r.best_epoch,
                r.epochs,
                r.overrides,
                r.note,
            ]
        )
    return buffer.getvalue()


def to_markdown(rows: list[Row], title: str) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in ("finished", "unfinished", "failed", "not started")}
    metric = leading_metric(rows)
    better = "lowest" if metric in LOWER_IS_BETTER else "highest"
    lines = [
        f"# Sweep {title}",
        "",
        f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".",
        "",
        f"Score: the best epoch's {_label(metric)} ({metric}, {better} first), the metric best.pt was kept by. "
        f"Interval: {CI_SOURCE}. Runs that are not finished show their best epoch so far from metrics.jsonl, "
        "without an interval, and have no rank.",
        "",
        f"| rank | task | {_label(metric)} (95% CI) | status | best epoch | epochs | overrides | note |",
        "|---:|---|---|---|---:|---|---|---|",
    ]
    for rank, r in zip(_ranks(rows), rows, strict=True):
        status = r.status if r.status == "finished" else f"**{r.status}**"
        epoch = "-" if r.best_epoch is None else str(r.best_epoch)
        score = _fmt(r) + ("" if r.metric == metric or r.score is None else f" ({r.metric})")
        cells = [rank, r.task, score, status, epoch, r.epochs, f"`{r.overrides}`" if r.overrides else "", r.note]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], out: Path, title: str) -> Path:
    """Best first, top to bottom: a dot with its 95% interval for ranked runs, a hollow grey one for unfinished
    runs; a run scored by another metric is left out (the table lists it)."""
    shown = [r for r in rows if r.score is not None and r.metric == leading_metric(rows)]
    fig = Figure(figsize=(9, 1.2 + 0.4 * max(len(shown), 1)), layout="constrained")
    ax = fig.add_subplot()
    for y, r in enumerate(shown):
        done = r.ranked
        error = [[r.score - r.ci[0]], [r.ci[1] - r.score]] if r.ci else None
        ax.errorbar(
            [r.score],
            [y],
            xerr=error,
            fmt="o",
            capsize=4,
            color="tab:blue" if done else "grey",
            markerfacecolor="tab:blue" if done else "white",
        )
    labels = [f"{r.task}: {r.overrides}" + ("" if r.status == "finished" else f" ({r.status})") for r in shown]
    ax.set_yticks(range(len(shown)), labels)
    ax.invert_yaxis()
    metric = leading_metric(rows)
    ax.set_xlabel(f"best {_label(metric)} (95% bootstrap CI over lesions; hollow: not finished or not ranked)")
    ax.set_title(f"sweep {title}" + ("" if shown else ": no run has a validation score yet"))
    ax.grid(axis="x", alpha=0.3)
    FigureCanvasAgg(fig)
    return atomic_write(out, lambda f: fig.savefig(f, dpi=110, format="png"))


def summarize_command(root: Path, out: Path | None = None) -> int:
    """Print the leaderboard and write leaderboard.csv, .md and .png into `out` (default: the sweep folder)."""
    rows = summarize(root)
    out = Path(out or root)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    title = Path(root).resolve().name
    markdown = to_markdown(rows, title)
    atomic_write(out / OUTPUTS[0], to_csv(rows))
    atomic_write(out / OUTPUTS[1], markdown)
    plot(rows, out / OUTPUTS[2], title)
    print(markdown, end="")
    print(f"\nwrote {out}/: {', '.join(OUTPUTS)}")
    return 0
