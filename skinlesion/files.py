"""The two file-system promises every stage makes: atomic writes, and one writer per output folder.

`atomic_write` puts the bytes in a temporary file in the destination's own folder, fsyncs it and
renames it over the destination, so a reader (or a resumed run) sees the old file or the new one,
never half of one. `FolderLock` is an ``fcntl.flock`` on ``<folder>/.lock``: the kernel releases it
when the holding process dies, so ``kill -9`` and a SLURM requeue need no clean-up, and a second
writer fails at once with the host, PID and SLURM job of the first. `output_folder` turns the
ways a folder can be unusable (a file in its place, no permission, a read-only mount) into one
line naming it. `read_jsonl` reads the append-only logs (metrics.jsonl) and survives a crash mid-append.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from skinlesion.errors import UserError

LOCK_NAME = ".lock"


def atomic_write(path: Path, data: bytes | str | Callable[[BinaryIO], Any]) -> Path:
    """Write `data` (bytes, text, or a function that writes to a binary file) to `path` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def output_folder(path: Path, what: str) -> Path:
    """Create `path` (and parents) if needed and check that files can be written in it.

    `what` names the setting the path came from (``train.output_dir``, ``--out``) for the error.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}={path} is a file, not a folder; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{what}={path} cannot be written ({exc.strerror or exc}); choose a writable folder") from exc
    return path


def locked_parents(path: Path) -> list[Path]:
    """The folders above `path`, outermost first, that have skinlesion's lock file (`FolderLock`'s JSON), held
    or not: a command that writes under one must hold its lock too (a training rewrites eval-val in its
    output_dir every epoch). Another program's ``.lock`` (pytest leaves one in its temporary folders) is not."""
    found = []
    for parent in reversed(Path(path).resolve().parents):
        try:
            holder = json.loads((parent / LOCK_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(holder, dict) and {"host", "pid"} <= set(holder):
            found.append(parent)
    return found


def _holder() -> dict[str, Any]:
    """Who holds a lock: enough for a user to find and stop the other writer."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        # The program and subcommand only: arguments may hold paths or tokens that do not belong in a shared file.
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:2]]) if sys.argv else "?",
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
        return f"host {info['host']}, PID {info['pid']}{job}, since {info['since']} ({info['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process (its details are unreadable)"


class FolderLock:
    """An exclusive, non-blocking lock on a folder: ``with FolderLock(folder, "train.output_dir"): ...``.

    Only the process that writes the folder takes it (the main process of a distributed run). It is
    released when the ``with`` block ends or the process dies, whichever comes first.
    """

    def __init__(self, folder: Path, what: str) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        except OSError as exc:
            raise UserError(f"cannot create {self.path} ({exc.strerror}); choose a writable {self.what}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise UserError(
                f"{self.path.parent} is in use by {holder}: one folder has one writer. Wait for it to "
                f"finish, stop it, or choose another {self.what}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def read_jsonl(path: Path, what: str, repair: bool = True) -> list[dict[str, Any]]:
    """The records of the append-only JSON-lines file `path` (one JSON object a line); [] when it does not exist.

    A process killed mid-append leaves its last line cut short (no newline, a JSON fragment, or the NUL bytes a
    power cut can leave). That line is dropped with a one-line warning naming `what` (e.g. "the run's
    metrics"), so a resume or requeue goes on instead of dying on it forever. With `repair`, the file is then
    rewritten atomically without it (and with a final newline, so the next append starts a line of its own);
    only the process that appends to the file may repair it, because a reader beside a live writer could cut
    the line the writer is finishing. A bad line before the last is not a crash's trace but damage: a
    `UserError` naming the file and line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({exc.strerror or exc})") from exc
    *lines, last = data.split(b"\n")  # last: b"" when the file ends with a newline, else a line without one
    kept = [(line, _json_record(path, what, n, line)) for n, line in enumerate(lines, start=1) if line.strip()]
    if last.strip():
        try:
            kept.append((last, _json_record(path, what, len(lines) + 1, last)))
        except UserError:
            shown = repr(last[:60].decode("utf-8", "replace")) + ("..." if len(last) > 60 else "")
            print(
                f"warning: {what} {path}: dropped its last line, cut short by a crash while it was written: {shown}",
                file=sys.stderr,
            )
    if repair and last:
        atomic_write(path, b"".join(line + b"\n" for line, _ in kept))
    return [record for _, record in kept]


def _json_record(path: Path, what: str, number: int, line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as exc:  # UnicodeDecodeError too
        raise UserError(f"{what} {path}, line {number}: not a JSON record ({exc}); fix or delete that line") from None
    if not isinstance(record, dict):
        raise UserError(f"{what} {path}, line {number}: a JSON record must be an object, got {line[:60]!r}")
    return record


# A full disk or an exhausted quota: the errno when Python sees it; the text when a library loses the errno:
# safetensors ("No space left on device (os error 28)") and torch.save's zip writer, whose RuntimeError reads
# "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534" or "PytorchStreamWriter failed writing".
_NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_ROOM_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "unexpected pos")


def no_room_reason(exc: BaseException) -> str | None:
    """A short reason when `exc` means the file system had no room for a write, else None.

    torch.save's writer error carries no errno; it is taken as a lack of room, which is how it happens in
    practice (the callers only ask about exceptions raised while writing).
    """
    if isinstance(exc, OSError) and exc.errno in _NO_ROOM_ERRNOS:
        return (exc.strerror or os.strerror(exc.errno)).lower()
    text = str(exc)
    if any(marker in text for marker in _NO_ROOM_TEXT):
        return "no space left on device"
    if isinstance(exc, RuntimeError) and any(marker in text for marker in _TORCH_WRITE_FAILED):
        return f"torch.save could not write ({' '.join(text.split())[:120]}), which means the disk is full"
    return None


def free_space(path: Path) -> str:
    """Free space on the file system holding `path` (or its nearest existing parent), for an error message."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "an unknown amount"
    return f"{free / 1e9:.1f} GB" if free >= 1e8 else f"{free / 1e6:.1f} MB"


@contextlib.contextmanager
def no_room_is_user_error(folder: Path, what: str, then: str) -> Iterator[None]:
    """Turn a full disk or quota while writing into `folder` into one line that names it.

    `what` names the setting the folder came from (``--out``); `then` says what was kept and what to do.
    Anything else propagates unchanged: it is not the user's to fix.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        reason = no_room_reason(exc)
        if reason is None:
            raise
        raise UserError(f"{what}={folder}: {reason} ({free_space(folder)} free there now); {then}") from exc
