"""W&B offline: the run under output_dir holds the logged history, and a resumed run continues its id.

The offline run file (``run-<id>.wandb``) is a LevelDB-style log of protobuf records; `history` reads
its history rows with W&B's own protobuf definitions, so the test checks what `wandb sync` would upload.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import metrics, run_train, tiny_shards

pytestmark = pytest.mark.slow
BLOCK, HEADER = 32768, 7


def history(run_file: Path) -> list[dict]:
    rows = []
    for record in _records(run_file):
        if record.HasField("history"):
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def _records(path: Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk = path.read_bytes(), HEADER, b""
    assert data[:4] == b":W&B"
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER]) if left >= HEADER else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        chunk += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_offline_run_holds_the_history_and_a_resumed_run_keeps_its_id(tmp_path: Path) -> None:
    shards, out = tiny_shards(tmp_path / "shards"), tmp_path / "run"
    assert run_train(out, shards, "wandb.mode=offline", "train.epochs=1").returncode == 0
    done = run_train(out, shards, "wandb.mode=offline", "train.epochs=2")  # resumes after epoch 0
    assert done.returncode == 0, done.stderr

    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    run_id = json.loads(next((out / "checkpoints").glob("step-*/trainer_state.json")).read_text())["wandb_run_id"]
    assert len(runs) == 2 and {p.stem for p in runs} == {f"run-{run_id}"}  # one W&B run, continued
    rows = history(runs[0]) + history(runs[1])
    losses = [r for r in rows if "train/loss" in r]
    assert [r["_step"] for r in losses] == list(range(1, 15))  # every step of both epochs (log_every_steps=1)
    assert all(r["train/lr"] > 0 and r["train/images_per_second"] > 0 for r in losses)
    val = [r for r in rows if "val/balanced_accuracy" in r]
    assert [r["epoch"] for r in val] == [0, 1]
    assert [r["val/loss"] for r in val] == [m["val_loss"] for m in metrics(out)]
