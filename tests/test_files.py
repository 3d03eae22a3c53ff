"""Append-only files (metrics.jsonl) survive a crash mid-append: `files.read_jsonl` drops a last line cut short,
with a warning, and repairs the file; damage before the last line is a one-line error naming the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skinlesion.errors import UserError
from skinlesion.files import read_jsonl

GOOD = b'{"epoch": 0, "val_balanced_accuracy": 0.5}\n{"epoch": 1, "val_balanced_accuracy": 0.6}\n'


@pytest.mark.parametrize("tail", [b'{"epoch": 2, "val_bal', b"\0\0\0\0", b'{"epoch": 2, "note": "caf\xc3'])
def test_a_last_line_cut_short_is_dropped_with_a_warning_and_the_file_repaired(tmp_path, capsys, tail) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(GOOD + tail)
    assert [r["epoch"] for r in read_jsonl(path, "the run's metrics")] == [0, 1]
    err = capsys.readouterr().err
    assert (
        err.startswith(f"warning: the run's metrics {path}: dropped its last line, cut short") and err.count("\n") == 1
    )
    assert path.read_bytes() == GOOD  # so that the next append starts a line of its own
    with path.open("a") as f:
        f.write(json.dumps({"epoch": 2}) + "\n")
    assert [r["epoch"] for r in read_jsonl(path, "the run's metrics")] == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_a_complete_last_record_without_its_newline_is_kept_and_terminated(tmp_path, capsys) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(GOOD + b'{"epoch": 2}')
    assert [r["epoch"] for r in read_jsonl(path, "metrics")] == [0, 1, 2]
    assert path.read_bytes() == GOOD + b'{"epoch": 2}\n' and capsys.readouterr().err == ""


def test_a_reader_that_must_not_write_leaves_the_file_alone(tmp_path, capsys) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(GOOD + b'{"epo')
    assert len(read_jsonl(path, "metrics", repair=False)) == 2
    assert path.read_bytes() == GOOD + b'{"epo' and "dropped its last line" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("damage", "message"),
    [(b'{"epoch": 1, "lo\n', "line 2: not a JSON record"), (b"[1, 2]\n", "line 2: a JSON record must be an object")],
)
def test_damage_before_the_last_line_is_one_line_naming_it(tmp_path, damage: bytes, message: str) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"epoch": 0}\n' + damage + b'{"epoch": 1}\n')
    before = path.read_bytes()
    with pytest.raises(UserError) as info:
        read_jsonl(path, "the run's metrics")
    assert str(info.value).startswith(f"the run's metrics {path}, {message}") and "\n" not in str(info.value)
    assert path.read_bytes() == before


def test_a_missing_file_has_no_records(tmp_path: Path) -> None:
    assert read_jsonl(tmp_path / "metrics.jsonl", "metrics") == []
