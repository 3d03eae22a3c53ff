"""What benchmarks/gpu-check.sh needs around the shipped recipe's run: its data, its log and its numbers.

The GPU check runs the recipe as users launch it (`accelerate launch ... train --config configs/ham10000.yaml`)
beside `bench step` at the same batch, precision and memory format, so that the figure it reports is the one
users get, not a harness's. Three helpers, each a subcommand of ``python -m skinlesion.recipe_check``:

- ``images SAMPLE DEST [LIMIT]``: real-content data at HAM10000's scale from the 150-image sample: a folder with one
  ``<image_id>.jpg`` for each of the real metadata's 10,015 image ids, each a symlink to one of the sample's
  images, cycled. Decoding, resizing and the JPEG sizes are then those of real dermoscopy.
- ``stamp``: copies stdin to stdout, each line (and each tqdm redraw, which ends in a carriage return) prefixed
  with the Unix time it arrived: the training log with the wall clock that `nvidia-smi dmon` also writes.
- ``summary RUN LOG DMON STEP_JSON``: prints the ``recipe`` block of summary.json (`recipe_summary`).
"""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from skinlesion.errors import UserError

# tqdm's bar for a training epoch, as epoch.py draws it: "epoch 4/30:  41%|####      | 135/328 [...]" (counted
# from 1), or "epoch 3:  41%..." (counted from 0) in logs written before the per-epoch line came.
_BAR = re.compile(r"epoch (\d+)(/\d+)?:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def real_content_images(sample: Path, dest: Path, limit: int | None = None) -> int:
    """One symlink per image id of `sample`'s metadata in `dest`, to the sample's images in turn; how many.
    With `limit`, that many ids, evenly spaced through the metadata (which is grouped by diagnosis)."""
    images = sorted((sample / "images").glob("*.jpg"))
    if not images:
        raise UserError(f"{sample}/images holds no .jpg files; pass the HAM10000 sample folder")
    with (sample / "HAM10000_metadata.csv").open(newline="") as f:
        ids = [row["image_id"] for row in csv.DictReader(f)]
    if limit is not None and limit < len(ids):
        ids = [ids[i * len(ids) // limit] for i in range(limit)]
    dest.mkdir(parents=True, exist_ok=True)
    for i, image_id in enumerate(ids):
        link = dest / f"{image_id}.jpg"
        link.unlink(missing_ok=True)
        link.symlink_to(images[i % len(images)].resolve())
    return len(ids)


def stamp(source: Any = None, sink: Any = None) -> None:
    """Each line or carriage-return-ended redraw of `source` to `sink` as ``<unix time> <text>``."""
    source, sink = source or sys.stdin.buffer, sink or sys.stdout
    pending = b""
    read = source.read1 if hasattr(source, "read1") else source.read  # read1: what has arrived, without waiting
    while chunk := read(65536):
        pending += chunk
        *done, pending = re.split(rb"[\r\n]", pending)
        for piece in done:
            if piece.strip():
                sink.write(f"{time.time():.3f} {piece.decode('utf-8', 'replace')}\n")
        sink.flush()
    if pending.strip():
        sink.write(f"{time.time():.3f} {pending.decode('utf-8', 'replace')}\n")


def epoch_windows(stamped: str) -> dict[int, tuple[float, float]]:
    """Epoch -> (time its first step was done, time its last was): from a `stamp`ed training log. Without the
    epoch's start-up (new loader, workers filling their buffers) and its validation, which follow the bar."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for line in stamped.splitlines():
        at, _, text = line.partition(" ")
        for match in _BAR.finditer(text):
            numbered, of, done, total = match.groups()
            epoch, done, total = int(numbered) - (1 if of else 0), int(done), int(total)  # metrics.jsonl's epoch
            if done >= 1:
                first.setdefault(epoch, float(at))
            if done == total:
                last.setdefault(epoch, float(at))
    return {e: (first[e], last[e]) for e in first if e in last and last[e] > first[e]}


def dmon_samples(text: str) -> list[tuple[float, float]]:
    """(unix time, SM %) of each sample of ``nvidia-smi dmon -s u -o DT`` (columns: date time gpu sm mem ...)."""
    samples = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or line.startswith("#") or not fields[3].isdigit():
            continue
        try:
            at = time.mktime(time.strptime(f"{fields[0]} {fields[1]}", "%Y%m%d %H:%M:%S"))
        except ValueError:
            continue
        samples.append((at, float(fields[3])))
    return samples


def mean_sm(samples: list[tuple[float, float]], window: tuple[float, float]) -> float | None:
    """Mean SM % of the samples inside `window` (dmon stamps whole seconds: the window is widened to them)."""
    start, end = int(window[0]), window[1]
    inside = [sm for at, sm in samples if start <= at <= end]
    return sum(inside) / len(inside) if inside else None


def recipe_summary(run: Path, log: Path, dmon: Path | None, step_json: Path) -> dict[str, Any]:
    """The recipe's last-epoch images/s (the first includes start-up) against `bench step` at its settings, the
    mean SM % during that epoch's steps (None without dmon, e.g. on the CPU) and torch.compile's seconds."""
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step = json.loads(step_json.read_text())["images_per_second"]
    rate = epochs[-1]["images_per_second"]
    window = tuple(epochs[-1]["steps_window"]) if "steps_window" in epochs[-1] else None  # the trainer's own
    if window is None:  # a run from before steps_window: the stamped log's tqdm bars
        window = epoch_windows(log.read_text(errors="replace")).get(epochs[-1]["epoch"])
    sm = None
    if dmon is not None and dmon.is_file() and window is not None:
        sm = mean_sm(dmon_samples(dmon.read_text(errors="replace")), window)
    compiled = [e["compile_seconds"] for e in epochs if e.get("compile_seconds") is not None]
    return {
        "images_per_second": rate,
        "step_images_per_second": step,
        "ratio_to_step": rate / step,
        "sm_busy": sm,
        "compile_seconds": compiled[0] if compiled else None,
        "epoch_seconds_measured": window[1] - window[0] if window else None,
        "train_loss": [e["train_loss"] for e in epochs],
    }


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "images":
        print(real_content_images(Path(args[0]), Path(args[1]), int(args[2]) if len(args) > 2 else None))
    elif command == "stamp":
        stamp()
    elif command == "summary":
        run, log, dmon, step = (Path(a) for a in args)
        print(json.dumps(recipe_summary(run, log, dmon, step)))
    else:
        raise SystemExit(f"usage: python -m skinlesion.recipe_check images|stamp|summary ...; got {command!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
