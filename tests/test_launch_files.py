"""The shipped launch files resolve, through Accelerate's own argument handling, to one process per GPU on 1, 2, 4
and 8 GPUs; no GPU needed.

`accelerate launch` reads num_processes from the config file and never counts GPUs when one is given, so a
fixed count there asks a 4-GPU box for 8 processes. What the shipped commands pass is captured by putting a
stand-in `accelerate` first on PATH (launch/all-gpus.sh, slurm/job.sh's per-node command), then parsed and
validated by `accelerate.commands.launch`, and turned into torchrun's processes per node by
`accelerate.utils.launch.prepare_multi_gpu_env`, as `accelerate launch` would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env
from helpers import REPO

BIN = Path(sys.executable).parent
TRAIN = ["-m", "skinlesion", "train", "--config", "configs/ham10000.yaml"]


def resolve(argv: list[str]) -> object:
    """`accelerate launch ARGV` up to the point where it starts processes: the resolved arguments."""
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    return args


def processes_per_node(args: object) -> int:
    if not args.multi_gpu:
        return args.num_processes
    prepare_multi_gpu_env(args)
    return int(args.nproc_per_node)


@pytest.fixture
def captured(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose `accelerate` only writes its arguments, one a line, to the returned file."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "accelerate").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (fake / "accelerate").chmod(0o755)
    out = tmp_path / "args"
    path = f"{fake}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return os.environ | {"PATH": path, "ARGS_OUT": str(out)}, out


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_all_gpus_launches_one_process_per_gpu(gpus: int, captured: tuple[dict[str, str], Path]) -> None:
    env, out = captured
    done = subprocess.run(
        [str(REPO / "launch/all-gpus.sh"), *TRAIN],
        env=env | {"GPUS": str(gpus)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    argv = out.read_text().splitlines()
    assert argv[0] == "launch" and argv[-len(TRAIN) :] == TRAIN
    args = resolve(argv[1:])
    assert args.num_processes == gpus and processes_per_node(args) == gpus
    assert args.multi_gpu == (gpus > 1) and args.num_machines == 1 and args.gpu_ids == "all"
    assert Path(args.config_file).name == ("one-gpu.yaml" if gpus == 1 else "multi-gpu.yaml")


def test_all_gpus_without_a_gpu_is_one_clear_line(captured: tuple[dict[str, str], Path]) -> None:
    """The count really comes from torch here (this machine has no CUDA): nothing is launched."""
    env, out = captured
    env = {k: v for k, v in env.items() if k != "GPUS"}
    done = subprocess.run(
        [str(REPO / "launch/all-gpus.sh"), *TRAIN], env=env, capture_output=True, text=True, timeout=60
    )
    if done.returncode == 0:
        pytest.skip("this machine has a CUDA GPU")
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.count("\n") == 1 and "no CUDA GPU" in done.stderr and "cpu-2proc.yaml" in done.stderr


def test_multi_gpu_yaml_never_assumes_a_gpu_count() -> None:
    """Without --num_processes Accelerate refuses the file instead of starting a fixed 8 processes."""
    config = str(REPO / "launch/multi-gpu.yaml")
    with pytest.raises(ValueError, match="num_processes"):
        resolve(["--config_file", config, *TRAIN])
    for gpus in (2, 4, 8):
        args = resolve(["--config_file", config, "--num_processes", str(gpus), *TRAIN])
        assert processes_per_node(args) == gpus and args.mixed_precision == "bf16"


def test_one_gpu_yaml_is_one_process_on_the_gpu_cuda_visible_devices_names() -> None:
    args = resolve(["--config_file", str(REPO / "launch/one-gpu.yaml"), *TRAIN])
    assert args.num_processes == 1 and not args.multi_gpu
    assert args.gpu_ids == "all"  # "0" would make accelerate overwrite CUDA_VISIBLE_DEVICES with physical GPU 0


@pytest.mark.parametrize(("gpus", "nodes"), [(1, 2), (2, 2), (4, 2), (8, 2), (8, 1), (0, 2)])
def test_multi_node_yaml_with_the_geometry_slurm_job_fills_in(
    gpus: int, nodes: int, captured: tuple[dict[str, str], Path]
) -> None:
    """slurm/job.sh's per-node command, run for node 1 of the job (0 GPUs: NPROC_PER_NODE=2 CPU processes)."""
    env, out = captured
    job = {
        "SLURM_GPUS_ON_NODE": str(gpus),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NODEID": str(nodes - 1),
        "NPROC_PER_NODE": "2",
        "MAIN_ADDR": "10.1.2.3",
        "MAIN_PORT": "21234",
        "REPO": str(REPO),
    }
    script = f'source {REPO}/slurm/job.sh && node_main "$@"'
    done = subprocess.run(
        ["bash", "-c", script, "node_main", "configs/smoke.yaml", "train.epochs=1"],
        env=env | job,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    argv = out.read_text().splitlines()
    assert argv[-2:] == ["configs/smoke.yaml", "train.epochs=1"]
    args = resolve(argv[1:])
    per_node = gpus or 2
    assert Path(args.config_file).name == "multi-node.yaml" and args.multi_gpu
    assert (args.num_processes, args.num_machines, args.machine_rank) == (per_node * nodes, nodes, nodes - 1)
    assert processes_per_node(args) == per_node
    assert args.mixed_precision == ("bf16" if gpus else "no")


def test_launch_files_the_docs_name_exist() -> None:
    """Every launch/ file the README and docs/cluster.md show is shipped, and all-gpus.sh is executable."""
    docs = (REPO / "README.md").read_text() + (REPO / "docs/cluster.md").read_text()
    for name in ("one-gpu.yaml", "multi-gpu.yaml", "multi-node.yaml", "cpu-2proc.yaml", "all-gpus.sh"):
        assert f"launch/{name}" in docs and (REPO / "launch" / name).is_file()
    assert os.access(REPO / "launch/all-gpus.sh", os.X_OK)
    for doc in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))):
        for number, line in enumerate(doc.read_text().splitlines(), 1):  # a command that Accelerate would refuse
            if "--config_file launch/multi-gpu.yaml" in line:
                assert "--num_processes" in line, f"{doc.name}:{number}: {line}"


def test_prepare_output_folders_of_the_readme_are_ignored_by_git() -> None:
    """`prepare --out shards-2019` (README) must not leave gigabytes of shards for `git add -A` to commit."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["shards-2019/train-000000.tar", "shards-2020/manifest.json", "shards-clinic/rejected.csv"]
    done = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.stdout.split() == paths, done.stderr
