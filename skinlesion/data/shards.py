"""Write WebDataset tar shards, rejected.csv and manifest.json, atomically.

Everything is built in a hidden folder beside OUT and renamed into place at the end, with
manifest.json written last: a folder named OUT with a manifest is always a complete dataset, and
an interrupted run leaves at most a `.OUT.partial-<pid>` folder behind. Files in OUT that prepare
did not write (shards/README.md) are carried over.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from skinlesion.errors import UserError

MANIFEST = "manifest.json"
REJECTED = "rejected.csv"
SUMMARY = "summary.txt"
_SHARD = re.compile(r"^(train|val|test)-\d{6}\.tar$")
_MTIME = 0  # fixed tar member times: the same inputs and seed give byte-identical shards


@dataclass(frozen=True)
class Entry:
    """One shard sample whose JPEG bytes wait in the spool file at [offset, offset + length)."""

    key: str
    offset: int
    length: int
    cls: int
    meta: dict


def shard_sizes(n_samples: int, min_shards: int, samples_per_shard: int | None = None) -> list[int]:
    """Samples per shard: at least min_shards shards (fewer only when there are fewer samples),
    none above samples_per_shard, sizes within one of each other.

    Readers split shards over ranks x workers; with at least that many shards no reader idles.
    """
    if n_samples == 0:
        return []
    n = max(min_shards, -(-n_samples // samples_per_shard) if samples_per_shard else 1)
    n = min(n, n_samples)
    base, extra = divmod(n_samples, n)
    return [base + 1] * extra + [base] * (n - extra)


def write_shard(path: Path, spool: Path, entries: list[Entry]) -> int:
    """Write one tar shard with webdataset's TarWriter: `__key__`, `jpg`, `cls` (class index as text),
    `json` (the metadata row). Shards are independent, so worker processes write them in parallel."""
    import webdataset as wds  # here, not at the top: it imports torch, which bad-input errors need not wait for

    with path.open("wb") as stream, wds.TarWriter(stream, encoder=False, mtime=_MTIME) as sink, spool.open("rb") as f:
        for e in entries:
            sink.write(
                {
                    "__key__": e.key,
                    "jpg": os.pread(f.fileno(), e.length, e.offset),
                    "cls": str(e.cls).encode("ascii"),
                    "json": json.dumps(e.meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
                }
            )
    return len(entries)


def write_rejected(path: Path, rejected: Iterable[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "reason"])
        writer.writerows(rejected)


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _is_dataset_file(name: str) -> bool:
    return name in (MANIFEST, REJECTED, SUMMARY) or bool(_SHARD.match(name))


def holds_dataset(out: Path) -> bool:
    """Whether OUT has a manifest or shards from an earlier prepare."""
    return out.is_dir() and any(_is_dataset_file(p.name) for p in out.iterdir())


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse early, before any work, an OUT that is a file or already holds a dataset."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    if not overwrite and holds_dataset(out):
        raise UserError(f"--out {out} already holds a dataset; pass --overwrite to replace it, or another --out")


class Build:
    """A temporary folder beside OUT that becomes OUT on `commit`, and vanishes on failure."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out).resolve()  # "." or "x/.." have no usable name for the sibling folder
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()

    def commit(self) -> None:
        """Swap the build in as OUT; keep files of the old OUT that are not part of a dataset."""
        if not self.out.exists():
            self.path.rename(self.out)
            return
        for entry in self.out.iterdir():
            if not _is_dataset_file(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, self.path / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, self.path / entry.name, follow_symlinks=False)
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        self.out.rename(old)
        self.path.rename(self.out)
        shutil.rmtree(old)

    def __enter__(self) -> Build:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
