"""Write WebDataset tar shards, rejected.csv and manifest.json into OUT, atomically (see `Build`).

A folder with a manifest.json is always a complete dataset: the manifest is the last file in.
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
from skinlesion.files import LOCK_NAME, FolderLock, atomic_write, output_folder

MANIFEST = "manifest.json"
REJECTED = "rejected.csv"
SUMMARY = "summary.txt"
INCOMPLETE = ".incomplete"  # present while a replacement is being moved into OUT
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
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def _is_dataset_file(name: str) -> bool:
    return name in (MANIFEST, REJECTED, SUMMARY) or bool(_SHARD.match(name))


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an OUT that prepare must not write into.

    Without --overwrite OUT must be missing or empty (hidden files aside); with it, OUT must hold a
    previous skinlesion dataset: its manifest, or the marker of an interrupted replacement.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    if not out.is_dir():
        return
    try:
        visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise UserError(f"--out {out} cannot be read ({exc.strerror}); choose another folder") from exc
    if not visible:
        return
    shown = ", ".join(visible[:3]) + (", ..." if len(visible) > 3 else "")
    dataset = (out / MANIFEST).is_file() or (out / INCOMPLETE).is_file()
    if not overwrite:
        hint = "pass --overwrite to replace it" if dataset else "pass an empty or new folder"
        raise UserError(f"--out {out} is not empty ({shown}); {hint}, or choose another --out")
    if not dataset:
        raise UserError(
            f"--out {out} holds files that are not a skinlesion dataset ({shown}); --overwrite only replaces "
            f"a previous dataset (one with {MANIFEST}): pass an empty or new folder"
        )


class Build:
    """Files are written into a hidden ``OUT/.partial-<pid>/`` and moved into OUT on `commit`.

    OUT itself is never removed, renamed or replaced, so its owner, mode, setgid bit, hard links and
    mount stay as the user made them, and ``--out .`` is fine. The folder is locked for the whole
    build (one writer). Until `commit`, an old dataset in OUT is untouched and usable; during it,
    OUT has no manifest and an ``.incomplete`` marker, so no reader takes it for complete, and the
    next ``prepare --overwrite`` repairs it. Files in OUT that prepare did not write are left alone.
    """

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.created = not Path(out).exists()
        self.out = output_folder(out, "--out")
        try:
            self.lock = FolderLock(self.out, "--out").acquire()
            check_destination(self.out, overwrite)  # again, now that no other prepare can change OUT
            for stale in self.out.glob(".partial-*"):  # left by a killed run: we hold the lock, it is dead
                shutil.rmtree(stale, ignore_errors=True)
            self.path = self.out / f".partial-{os.getpid()}"
            self.path.mkdir()
        except BaseException:
            self._abandon()
            raise

    def commit(self) -> None:
        """Replace the old dataset's files with the new ones; manifest.json last."""
        (self.out / INCOMPLETE).write_bytes(b"")
        (self.out / MANIFEST).unlink(missing_ok=True)
        new = {p.name for p in self.path.iterdir() if _is_dataset_file(p.name)}
        for entry in self.out.iterdir():
            if _is_dataset_file(entry.name) and entry.name not in new and entry.is_file():
                entry.unlink()
        for name in [*sorted(new - {MANIFEST}), MANIFEST]:
            os.replace(self.path / name, self.out / name)
        (self.out / INCOMPLETE).unlink()

    def __enter__(self) -> Build:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if exc_type is None:
            self.lock.release()
        else:
            self._abandon()

    def _abandon(self) -> None:
        """After a failure, a folder this run created and left empty goes again: nothing looks written."""
        lock = getattr(self, "lock", None)
        if self.created and not [p for p in self.out.iterdir() if p.name != LOCK_NAME]:
            (self.out / LOCK_NAME).unlink(missing_ok=True)
            self.out.rmdir()
        if lock is not None:
            lock.release()
