"""Real 2-process DDP on CPU through both launchers: synchronised ranks, no hang on uneven shards.

On a machine without CUDA, `accelerate launch --multi_gpu` and `torchrun` happily start processes that
each train alone; these tests fail if that happens (the ranks' parameters would differ). A spy wraps
`validate` to save each rank's parameters after its last step.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from helpers import REPO, TINY, env, free_port, kill_tree, metrics, write_shards

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent

SPY = """
import sys, torch
import skinlesion.train as T
real = T.validate
def spy(accelerator, model, cfg, *args, **kwargs):
    params = {k: v.detach().cpu() for k, v in accelerator.unwrap_model(model).named_parameters()}
    torch.save(params, f"{cfg.train.output_dir}/params-rank{accelerator.process_index}.pt")
    return real(accelerator, model, cfg, *args, **kwargs)
T.validate = spy
from skinlesion.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 train shards of unequal size for 2 ranks x 2 workers: the case that hangs naive pipelines."""
    return write_shards(tmp_path_factory.mktemp("uneven") / "shards", {"train": [20, 9, 13], "val": [7, 5, 4]})


def launcher_cmd(launcher: str, script: Path) -> list[str]:
    port = str(free_port())
    if launcher == "cpu-2proc.yaml":  # what `make demo` uses without a GPU
        return [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(REPO / "launch/cpu-2proc.yaml"),
            "--main_process_port",
            port,
            str(script),
        ]
    if launcher == "accelerate":
        flags = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # silence defaults
        return [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            *flags,
            "--main_process_port",
            port,
            str(script),
        ]
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, str(script)]


def train_cmd(launcher: str, tmp_path: Path, shards: Path, out: Path, *overrides: str) -> list[str]:
    script = tmp_path / "spy_train.py"
    script.write_text(SPY)
    return [
        *launcher_cmd(launcher, script),
        "train",
        "--config",
        str(REPO / "configs/smoke.yaml"),
        f"data.shards={shards}",
        f"train.output_dir={out}",
        *TINY,
        "data.batch_size=4",
        "data.num_workers=2",
        *overrides,
    ]


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun", "cpu-2proc.yaml"])
def test_two_processes_train_in_sync_on_uneven_shards(launcher: str, uneven: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = train_cmd(launcher, tmp_path, uneven, out)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["runtime"]["world_size"] == 2 and config["runtime"]["distributed_type"] == "MULTI_CPU"
    rank0 = torch.load(out / "params-rank0.pt", weights_only=True)
    rank1 = torch.load(out / "params-rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks trained apart: DDP is not synchronising"
    final = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], rank0[k]) for k in rank0)
    lines = metrics(out)
    assert [m["epoch"] for m in lines] == [0, 1]
    assert lines[-1]["step"] == 2 * (42 // 2 // 4)  # same step count on both ranks, from the manifest
    assert lines[-1]["val_samples"] == 16  # each val sample once across the two ranks
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-00000010"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in (out / "checkpoints/step-00000010").iterdir()
    }


def test_a_signal_to_one_rank_stops_both_at_the_same_step(uneven: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = train_cmd("torchrun", tmp_path, uneven, out, "train.epochs=20")
    log = (tmp_path / "log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env(), cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").is_file():  # wait until both ranks are deep in the loop
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.1)
        spies = [
            p for p in psutil.Process(proc.pid).children(recursive=True) if "spy_train.py" in " ".join(p.cmdline())
        ]
        ranks = [p for p in spies if p.ppid() not in {s.pid for s in spies}]  # not their loader workers (same cmdline)
        assert len(ranks) == 2
        ranks[1].send_signal(signal.SIGUSR1)  # only one rank hears it, as with a per-node signal
        assert proc.wait(timeout=120) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        kill_tree(proc.pid)  # the launcher and its ranks: a rank left behind waits on its peer for dist_timeout_s
    preempted = json.loads((out / "preempted").read_text())
    assert preempted["signal"] == "SIGUSR1"
    assert (out / "checkpoints" / f"step-{preempted['step']:08d}" / "COMPLETE").is_file()
    assert preempted["epoch"] < 19 and not (out / "model.pt").exists()
