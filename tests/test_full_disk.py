"""A full disk is one line naming the folder, exit status 2, and nothing good lost (issue 16, point 14).

Before, `prepare` died with an ``OSError [Errno 28]`` traceback, and `train` with torch's ``RuntimeError:
[enforce fail at inline_container.cc...]``. The disk is not filled here: the writers are made to raise what
they raise on a full disk, and where this process may mount one, a real 1 MB tmpfs fills up.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import REPO, STEPS_PER_EPOCH, TINY, dataset_files, env, prepare_args, small_options, tiny_shards
from safetensors.torch import load_file
from torch import nn

from skinlesion import checkpoint
from skinlesion.checkpoint import (
    TrainerState,
    export_best,
    export_model,
    load_checkpoint,
    save_checkpoint,
)
from skinlesion.cli import main
from skinlesion.data import shards
from skinlesion.data.prepare import prepare
from skinlesion.errors import UserError
from skinlesion.facts import ModelFacts
from skinlesion.labels import CLASSES

# What torch.save raises when the disk fills under its zip writer (seen on a full tmpfs).
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _last_line_only(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def test_prepare_on_a_full_disk_is_one_line_and_keeps_the_previous_dataset(
    synthetic_dir, tmp_path, monkeypatch, capsys
) -> None:
    opts = small_options(synthetic_dir, tmp_path, n=40)
    prepare(opts)
    before = dataset_files(opts.out)
    monkeypatch.setattr(shards, "write_shard", _enospc)  # the disk fills while the new shards are written
    assert main([*prepare_args(opts, "--min-shards", "3", "--workers", "1"), "--overwrite"]) == 2
    line = _last_line_only(capsys.readouterr().err)
    assert f"--out={opts.out}: no space left on device" in line and "free there now" in line
    assert dataset_files(opts.out) == before  # old dataset intact
    assert not [p for p in opts.out.iterdir() if p.name.startswith((".partial", ".incomplete"))]


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 1 MB tmpfs, where this process may mount one (root in a mount namespace); else the test skips."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_prepare_filling_a_real_disk_is_one_line(synthetic_dir, tmp_path, tiny_tmpfs, capsys) -> None:
    # 400 images kept at 256 px are several MB: the spool fills the 1 MB disk.
    opts = replace(small_options(synthetic_dir, tmp_path, n=400), out=tiny_tmpfs / "shards", image_size=256)
    assert main(prepare_args(opts, "--min-shards", "3", "--workers", "1")) == 2
    line = _last_line_only(capsys.readouterr().err)
    assert f"--out={opts.out}: no space left on device" in line
    assert list(tiny_tmpfs.iterdir()) == []  # the folder prepare created is gone again, and so is the spool


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def _prepared(accelerator: Accelerator) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    return accelerator.prepare(model, torch.optim.AdamW(model.parameters()))


@pytest.mark.parametrize("where", ["torch.save", "trainer_state.json"])
def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one(accelerator, tmp_path, monkeypatch, where) -> None:
    model, _ = _prepared(accelerator)
    save_checkpoint(accelerator, tmp_path, TrainerState(step=7, arch="x"), keep=2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)  # trained on: the failed checkpoint would have held these weights
    if where == "torch.save":  # accelerate saves the optimizer with torch.save, after the model
        real = torch.save

        def save(obj, f, *args, **kwargs):
            real(obj, f, *args, **kwargs)  # part of the file is on disk when the disk fills
            raise RuntimeError(TORCH_FULL)

        monkeypatch.setattr(torch, "save", save)
    else:  # the main process seals the folder: the disk fills on trainer_state.json
        real_write = Path.write_text

        def write_text(path: Path, *args, **kwargs):
            if path.name == checkpoint.STATE_FILE:
                _enospc()
            return real_write(path, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(UserError) as caught:
        save_checkpoint(accelerator, tmp_path, TrainerState(step=14, arch="x"), keep=2)
    monkeypatch.undo()
    message = str(caught.value)
    assert "\n" not in message
    assert f"could not write checkpoint step-00000014 in {tmp_path / 'checkpoints'}: " in message
    assert "the previous checkpoint step-00000007 is complete" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000007"]  # no half folder
    state, folder = load_checkpoint(accelerator, "auto", tmp_path, "x")
    assert (state.step, folder.name) == (7, "step-00000007")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_an_error_that_is_not_the_disk_keeps_its_traceback(accelerator, tmp_path, monkeypatch) -> None:
    _prepared(accelerator)
    monkeypatch.setattr(accelerator, "save_state", lambda *a, **k: {}["a bug"])
    with pytest.raises(KeyError):
        save_checkpoint(accelerator, tmp_path, TrainerState(step=3), keep=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # its half-written folder is removed all the same


@pytest.mark.parametrize("export", ["model.pt", "best.pt"])
def test_an_export_that_does_not_fit_keeps_the_previous_file(tmp_path, monkeypatch, export) -> None:
    facts = ModelFacts(arch="resnet18", classes=CLASSES, image_size=32)

    def write(state: dict[str, torch.Tensor]) -> None:
        if export == "model.pt":
            export_model(state, tmp_path / export, facts)
        else:
            export_best(state, tmp_path / export, facts=facts, epoch=0, step=1, metric={"name": "m", "value": 0.5})

    write({"w": torch.zeros(3)})
    before = (tmp_path / export).read_bytes()
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(
        UserError,
        match=rf"train.output_dir={tmp_path}: torch.save could not write .* the previous "
        rf"{export} is untouched",
    ):
        write({"w": torch.ones(3)})
    assert (tmp_path / export).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [export]  # no temporary file left


@pytest.mark.slow
def test_train_on_a_full_disk_exits_2_with_one_line_and_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    # A real training run as the CLI runs it; torch.save fails (as on a full disk) in the second checkpoint.
    out, data = tmp_path / "run", tiny_shards(tmp_path / "shards")
    failing = f".tmp-step-{2 * STEPS_PER_EPOCH:08d}"
    script = textwrap.dedent(f"""
        import sys, torch
        real = torch.save
        def save(obj, f, *args, **kwargs):
            if {failing!r} in str(f):
                raise RuntimeError({TORCH_FULL!r})
            return real(obj, f, *args, **kwargs)
        torch.save = save
        from skinlesion.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    args = [
        "train",
        "--config",
        str(REPO / "configs/smoke.yaml"),
        f"data.shards={data}",
        f"train.output_dir={out}",
        *TINY,
    ]
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, env=env(), cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr[-3000:]
    line = _last_line_only(done.stderr)
    assert f"could not write checkpoint step-{2 * STEPS_PER_EPOCH:08d} in {out / 'checkpoints'}" in line
    first = f"step-{STEPS_PER_EPOCH:08d}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [first]
    assert load_file(out / "checkpoints" / first / "model.safetensors")  # complete and readable
    again = subprocess.run(
        [sys.executable, "-m", "skinlesion", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / first}" in again.stdout and (out / "model.pt").is_file()
