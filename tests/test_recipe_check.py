"""What the GPU check reads around the recipe's run: the epoch windows of its log, dmon's SM %, its data."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest

from skinlesion.errors import UserError
from skinlesion.recipe_check import (
    dmon_samples,
    epoch_windows,
    mean_sm,
    real_content_images,
    recipe_summary,
    stamp,
)

# A stamped training log as train.py's tqdm bars draw it (carriage-return redraws), then validation output.
LOG = """\
100.0 epoch 0:   0%|          | 0/3 [00:00<?, ?it/s]
101.0 epoch 0:  33%|###       | 1/3 [00:01<00:02, 1.0it/s]
102.0 epoch 0: 100%|##########| 3/3 [00:02<00:00, 1.5it/s, img_s=90, loss=2.0]
102.0 epoch 0: 100%|##########| 3/3 [00:02<00:00, 1.5it/s, img_s=90, loss=2.0]
103.0 val balanced accuracy 0.2
110.0 epoch 1:   0%|          | 0/3 [00:00<?, ?it/s]
112.0 epoch 1:  33%|###       | 1/3 [00:01<00:02, 1.0it/s]
115.0 epoch 1: 100%|##########| 3/3 [00:03<00:00, 1.0it/s, img_s=60, loss=1.9]
"""


def _dmon(start: float, values: list[int]) -> str:
    rows = [
        "#Date       Time        gpu    sm   mem   enc   dec   jpg   ofa",
        "#YYYYMMDD   HH:MM:SS    Idx     %     %     %     %     %     %",
    ]
    for i, sm in enumerate(values):
        when = time.strftime("%Y%m%d %H:%M:%S", time.localtime(start + i))
        rows.append(f" {when.replace(' ', '   ')}      0    {sm}    20     0     0     0     0")
    rows.append(" 20261126   12:00:00      0     -     -     -     -     -     -")  # a sample without a reading
    return "\n".join(rows) + "\n"


def test_epoch_windows_run_from_the_first_step_to_the_last() -> None:
    # Epoch 1 starts at its first finished step (112), not at the bar's creation (110, worker start-up).
    assert epoch_windows(LOG) == {0: (101.0, 102.0), 1: (112.0, 115.0)}
    # Today's bars count from 1 ("epoch 1/2"); the windows stay keyed by metrics.jsonl's epoch, from 0.
    current = re.sub(r"epoch (\d+):", lambda m: f"epoch {int(m.group(1)) + 1}/2:", LOG)
    assert "epoch 2/2:" in current and epoch_windows(current) == epoch_windows(LOG)


def test_mean_sm_takes_the_dmon_samples_inside_the_window() -> None:
    start = 1_800_000_000.0
    samples = dmon_samples(_dmon(start, [0, 0, 90, 80, 70, 0]))
    assert [sm for _, sm in samples] == [0, 0, 90, 80, 70, 0] and samples[2][0] == start + 2
    assert mean_sm(samples, (start + 2.4, start + 4.6)) == 80  # dmon's whole seconds 2, 3 and 4
    assert mean_sm(samples, (start + 100, start + 101)) is None


def test_stamp_splits_tqdm_redraws_into_stamped_lines() -> None:
    sink = io.StringIO()
    stamp(io.BytesIO(b"epoch 0:   0%| | 0/3\repoch 0:  33%| | 1/3\rdone\nlast"), sink)
    lines = sink.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["epoch 0:   0%| | 0/3", "epoch 0:  33%| | 1/3", "done", "last"]
    assert all(float(line.split(" ", 1)[0]) > 1e9 for line in lines)


def test_recipe_summary_takes_the_last_epoch_against_bench_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    epochs = [
        {"epoch": 0, "train_loss": 2.0, "images_per_second": 90.0, "compile_seconds": 41.5},
        {"epoch": 1, "train_loss": 1.9, "images_per_second": 150.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    (tmp_path / "step.json").write_text(json.dumps({"images_per_second": 200.0}))
    start = time.mktime(time.strptime("20261126 12:00:00", "%Y%m%d %H:%M:%S"))
    log = "".join(
        f"{start + float(line.split(' ', 1)[0]) - 100} {line.split(' ', 1)[1]}\n" for line in LOG.splitlines()
    )
    (tmp_path / "log").write_text(log)
    (tmp_path / "dmon").write_text(_dmon(start, [0] * 12 + [60, 70, 80, 90] + [0] * 5))
    result = recipe_summary(run, tmp_path / "log", tmp_path / "dmon", tmp_path / "step.json")
    assert result["images_per_second"] == 150 and result["ratio_to_step"] == 0.75
    assert result["sm_busy"] == 75 and result["compile_seconds"] == 41.5 and result["epoch_seconds_measured"] == 3
    cpu = recipe_summary(run, tmp_path / "log", tmp_path / "absent", tmp_path / "step.json")
    assert cpu["sm_busy"] is None


def test_real_content_images_cycle_the_sample_over_the_metadata_ids(shared_sample: Path, tmp_path: Path) -> None:
    count = real_content_images(shared_sample, tmp_path / "images")
    ids = (shared_sample / "HAM10000_metadata.csv").read_text().splitlines()[1:]
    links = sorted((tmp_path / "images").iterdir())
    assert count == len(ids) == len(links) and all(p.is_symlink() and p.resolve().is_file() for p in links)
    assert len({p.resolve() for p in links}) == len(list((shared_sample / "images").glob("*.jpg")))
    assert real_content_images(shared_sample, tmp_path / "few", limit=30) == 30


def test_a_sample_without_images_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match=r"holds no \.jpg files; pass the HAM10000 sample folder"):
        real_content_images(tmp_path, tmp_path / "out")
