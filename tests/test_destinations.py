"""Output folders the user names are filled, never removed or replaced (issue 8, cases 5, 6 and 10).

prepare and synth write into OUT; they accept only an empty folder, or with --overwrite one holding
their own previous output, and replace only the files they wrote. An unusable destination is one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import dataset_files, prepare_args, small_options

from skinlesion.cli import main
from skinlesion.data import shards
from skinlesion.data.prepare import prepare
from skinlesion.data.synthetic import generate
from skinlesion.errors import UserError

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def test_prepare_keeps_the_folder_itself_owner_mode_setgid_and_inode(synthetic_dir: Path, tmp_path: Path) -> None:
    opts = small_options(synthetic_dir, tmp_path, n=40)
    opts.out.mkdir()
    os.chown(opts.out, 65534, 65534)  # nobody:nogroup (the tests run as root in CI; harmless otherwise)
    os.chmod(opts.out, 0o2775)
    before = os.stat(opts.out)
    prepare(opts)
    prepare(replace(opts, overwrite=True, seed=1))
    after = os.stat(opts.out)
    assert (after.st_ino, after.st_uid, after.st_gid, after.st_mode) == (
        before.st_ino,
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )
    assert oct(after.st_mode & 0o7777) == "0o2775"
    assert os.stat(opts.out / "manifest.json").st_gid == 65534  # the setgid folder's group is inherited


def test_non_empty_folder_that_is_not_a_dataset_is_refused_even_with_overwrite(synthetic_dir, tmp_path) -> None:
    opts = small_options(synthetic_dir, tmp_path, n=40)
    opts.out.mkdir()
    (opts.out / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match=r"is not empty \(thesis.tex\); pass an empty or new folder"):
        prepare(opts)
    with pytest.raises(UserError, match="holds files that are not a skinlesion dataset"):
        prepare(replace(opts, overwrite=True))
    assert sorted(p.name for p in opts.out.iterdir() if p.name != ".lock") == ["thesis.tex"]


def test_a_file_as_out_and_an_unwritable_out_are_one_line(synthetic_dir: Path, tmp_path: Path, capsys) -> None:
    opts = small_options(synthetic_dir, tmp_path, n=40)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    common = ["--metadata", str(opts.metadata), "--images", str(opts.images[0]), "--image-size", "32"]
    for out, message in ((blocker, "is a file"), (blocker / "sub", "cannot be written")):
        assert main(["prepare", *common, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert main(["synth", str(out), "--images", "7"]) == 2
        err = capsys.readouterr().err
        assert (message in err or "is a file" in err) and err.count("\n") == 1


def test_out_dot_fills_the_current_folder(synthetic_dir: Path, tmp_path: Path) -> None:
    opts = small_options(synthetic_dir, tmp_path, n=40)
    opts.out.mkdir()
    args = prepare_args(opts, "--min-shards", "2", "--workers", "1", out=".")
    code = "import sys, os; from skinlesion.cli import main; c = main(sys.argv[1:]); os.getcwd(); sys.exit(c)"
    for extra in ([], ["--overwrite"]):
        done = subprocess.run([sys.executable, "-c", code, *args, *extra], cwd=opts.out, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr  # os.getcwd() raises in a deleted directory
    assert (opts.out / "manifest.json").is_file()


def test_mount_point_as_out(synthetic_dir: Path, tmp_path: Path) -> None:
    opts = small_options(synthetic_dir, tmp_path, n=40)
    source, target = tmp_path / "device", tmp_path / "mnt"
    source.mkdir()
    target.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts are refused here (not root, or no CAP_SYS_ADMIN)")
    try:
        prepare(replace(opts, out=target))
        prepare(replace(opts, out=target, overwrite=True, seed=1))  # renaming a mount point would be EBUSY
        assert (source / "manifest.json").is_file()
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_interrupted_build_leaves_the_old_dataset_usable(synthetic_dir, tmp_path, monkeypatch) -> None:
    opts = small_options(synthetic_dir, tmp_path, n=40)
    prepare(opts)
    old = dataset_files(opts.out)

    def crash(*args: object) -> int:
        raise KeyboardInterrupt  # Ctrl-C while shards are written

    monkeypatch.setattr("skinlesion.data.prepare._write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(replace(opts, overwrite=True, seed=1))
    assert dataset_files(opts.out) == old
    assert not list(opts.out.glob(".partial-*"))


def test_interrupted_commit_is_visibly_incomplete_and_repaired_by_the_next_run(synthetic_dir, tmp_path, monkeypatch):
    opts = small_options(synthetic_dir, tmp_path, n=40)
    prepare(opts)
    real, moved = os.replace, []

    def replace_then_die(src: object, dst: object) -> None:
        if moved:
            raise KeyboardInterrupt
        moved.append(dst)
        real(src, dst)

    monkeypatch.setattr(shards.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(replace(opts, overwrite=True, seed=1))
    monkeypatch.undo()
    assert not (opts.out / "manifest.json").exists() and (opts.out / ".incomplete").exists()
    assert main(["evaluate", "--checkpoint", "x.pt", "--shards", str(opts.out)]) == 2  # a reader refuses it
    with pytest.raises(UserError, match="pass --overwrite"):
        prepare(opts)
    prepare(replace(opts, overwrite=True, seed=1))
    assert (opts.out / "manifest.json").is_file() and not (opts.out / ".incomplete").exists()


def test_old_shards_that_the_new_dataset_lacks_are_removed(synthetic_dir: Path, tmp_path: Path) -> None:
    opts = small_options(synthetic_dir, tmp_path, n=40)
    prepare(replace(opts, min_shards=5))
    prepare(replace(opts, min_shards=2, overwrite=True))
    manifest = json.loads((opts.out / "manifest.json").read_text())
    listed = {f for split in manifest["splits"].values() for f in split["files"]}
    assert {p.name for p in opts.out.glob("*.tar")} == listed


def test_synth_refuses_a_non_empty_folder_and_replaces_only_its_own_files(tmp_path: Path) -> None:
    out = tmp_path / "data"
    generate(out, n_images=30, workers=1)
    csv = (out / "HAM10000_metadata.csv").read_bytes()
    with pytest.raises(UserError, match=r"is not empty .* pass --overwrite"):
        generate(out, n_images=20, seed=1, workers=1)
    assert (out / "HAM10000_metadata.csv").read_bytes() == csv  # not overwritten
    (out / "HAM10000_images_part_1" / "mine.jpg").write_bytes(b"user's")
    generate(out, n_images=20, seed=1, workers=1, overwrite=True)
    ids = {line.split(",")[1] for line in (out / "HAM10000_metadata.csv").read_text().splitlines()[1:]}
    images = {p.stem for p in out.glob("HAM10000_images_part_*/ISIC_*.jpg")}
    assert images == ids and len(ids) == 20  # no image of the 30-image plan lingers
    assert (out / "HAM10000_images_part_1" / "mine.jpg").read_bytes() == b"user's"


def test_synth_never_writes_into_a_folder_of_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"notes\.txt"):
            generate(tmp_path, n_images=10, workers=1, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.fixture
def read_only(tmp_path: Path):
    """A read-only folder that even root cannot write: a read-only bind mount (chmod does not stop root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_destinations_are_one_line_for_every_command(
    read_only, synthetic_dir, random_run, shards_dir, capsys
) -> None:
    out = read_only / "x"
    commands = [
        ["synth", str(out), "--images", "7"],
        [
            "prepare",
            "--metadata",
            str(synthetic_dir / "HAM10000_metadata.csv"),
            "--images",
            str(synthetic_dir / "HAM10000_images_part_1"),
            "--out",
            str(out),
        ],
        ["evaluate", "--checkpoint", str(random_run / "best.pt"), "--shards", str(shards_dir), "--out", str(out)],
        ["train", "--config", str(SMOKE), f"data.shards={shards_dir}", f"train.output_dir={out}"],
    ]
    for command in commands:
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "cannot be written" in err and str(out) in err and err.count("\n") == 1, err


def test_prepare_refuses_an_image_size_that_would_upscale_to_gigabytes(synthetic_dir, tmp_path, capsys) -> None:
    opts = small_options(synthetic_dir, tmp_path, n=10)
    assert main(prepare_args(opts, size=100000)) == 2
    assert "--image-size 100000 must be 16 to 4096" in capsys.readouterr().err
    assert not opts.out.exists()


def test_the_lock_names_its_holder_without_its_arguments(tmp_path: Path, monkeypatch) -> None:
    from skinlesion.files import FolderLock

    monkeypatch.setattr(sys, "argv", ["/venv/bin/skinlesion", "serve", "--token", "s3cret"])
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with FolderLock(tmp_path, "--out"):
        assert "s3cret" not in (tmp_path / ".lock").read_text()
        code = "from skinlesion.files import FolderLock; import sys; FolderLock(sys.argv[1], '--out').acquire()"
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0
    assert f"PID {os.getpid()}, SLURM job 4242" in done.stderr and "(skinlesion serve)" in done.stderr
    FolderLock(tmp_path, "--out").acquire().release()  # released with the holder
