"""Sweeps: the plan a sweep file expands to, the errors a bad one gets, the leaderboard of a sweep folder, and
(on the local SLURM cluster) a job array whose preempted task requeues alone, resumes and finishes.

What a user relies on: every array task computes the same plan (random choices come from the file's seed); a
mistake fails at plan time in one line naming the file and key; summarize ranks finished runs by their best
val balanced accuracy with its interval and marks the rest.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import FINISHED, REPO, Cluster, job_info, job_log, wait_for
from helpers import TINY_MODEL as TINY

from skinlesion import tracking
from skinlesion.cli import main
from skinlesion.config import load_config
from skinlesion.errors import UserError
from skinlesion.leaderboard import summarize, summarize_command
from skinlesion.sweep import load_sweep

BASE = str(REPO / "configs" / "smoke.yaml")


def write_sweep(tmp_path: Path, body: dict, name: str = "mysweep") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base": BASE} | body, sort_keys=False))
    return path


def test_grid_is_the_product_in_file_order_with_the_sweeps_own_keys(tmp_path: Path, capsys) -> None:
    grid = {"train.lr": [1e-3, 3e-3], "train.label_smoothing": [0.0, 0.1], "model.name": ["resnet18"]}
    body = {"output_root": str(tmp_path / "runs"), "max_parallel": 3, "fixed": {"train.epochs": 2}, "grid": grid}
    sweep = load_sweep(write_sweep(tmp_path, body))
    assert sweep.name == "mysweep"
    assert [list(t) for t in sweep.tasks] == [
        ["train.lr=0.001", "train.label_smoothing=0.0", "model.name=resnet18"],
        ["train.lr=0.001", "train.label_smoothing=0.1", "model.name=resnet18"],
        ["train.lr=0.003", "train.label_smoothing=0.0", "model.name=resnet18"],
        ["train.lr=0.003", "train.label_smoothing=0.1", "model.name=resnet18"],
    ]
    args = sweep.train_args(2)
    cfg = load_config(Path(args[0]), args[1:])
    assert (cfg.train.lr, cfg.train.label_smoothing, cfg.train.epochs) == (3e-3, 0.0, 2)
    assert cfg.train.output_dir == tmp_path / "runs" / "2"
    assert (cfg.wandb.group, cfg.wandb.name) == ("mysweep", "mysweep-2")

    assert main(["sweep", "plan", str(sweep.file)]) == 0
    out = capsys.readouterr().out
    assert "  3  train.lr=0.003 train.label_smoothing=0.1 model.name=resnet18" in out
    assert f"sbatch --array=0-3%3 slurm/sweep.sbatch {sweep.file}" in out


def test_random_choices_are_reproducible_from_the_seed(tmp_path: Path) -> None:
    choices = {
        "train.weight_decay": [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09],
        "train.seed": list(range(10)),
    }
    body = {"seed": 7, "grid": {"train.lr": [1e-3, 2e-3]}, "random": {"samples": 6, "choices": choices}}
    first, again = load_sweep(write_sweep(tmp_path, body)), load_sweep(write_sweep(tmp_path, body, "again"))
    other = load_sweep(write_sweep(tmp_path, body | {"seed": 8}, "other"))
    assert len(first.tasks) == 12  # each grid point gets `samples` draws
    assert first.tasks == again.tasks
    assert first.tasks != other.tasks
    allowed = {f"train.weight_decay={v!r}" for v in choices["train.weight_decay"]}
    assert all(t[0].startswith("train.lr=") and t[1] in allowed for t in first.tasks)
    assert [t[0] for t in first.tasks] == ["train.lr=0.001"] * 6 + ["train.lr=0.002"] * 6


def test_string_values_that_yaml_would_read_otherwise_stay_strings(tmp_path: Path) -> None:
    sweep = load_sweep(
        write_sweep(tmp_path, {"grid": {"model.pretrained": ["1.5", "none"], "train.mixed_precision": ["no"]}})
    )
    args = sweep.train_args(0)
    cfg = load_config(Path(args[0]), args[1:])
    assert cfg.model.pretrained == "1.5" and cfg.train.mixed_precision == "no"


def test_the_shipped_example_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # its base is relative to the checkout, where a user runs it
    sweep = load_sweep(Path("configs/sweeps/smoke-lr-ls.yaml"))
    assert len(sweep.tasks) == 4 and sweep.output_root == Path("runs/smoke-lr-ls")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"gird": {"train.lr": [1]}}, "unknown key 'gird' (did you mean 'grid'?)"),
        ({"grid": {"train.lr": []}}, "grid key 'train.lr' has an empty list of values"),
        ({"grid": {"train.lr": 0.1}}, "grid key 'train.lr' must be a list of values"),
        ({"grid": {"lr": [0.1]}}, "grid key 'lr' is not a dotted config key (section.key); did you mean 'train.lr'?"),
        ({"grid": {"train.lr_rate": [0.1]}}, "grid key 'train.lr_rate' is not a config key; did you mean 'train.lr'?"),
        ({"grid": {"train.lr": [1e-3, -1.0]}}, "task 1 (train.lr=-1.0): config key 'train.lr' must be > 0, got -1.0"),
        ({"grid": {"train.epochs": ["two"]}}, "config key 'train.epochs' must be an integer, got 'two'"),
        ({"grid": {"train.output_dir": ["a"]}}, "grid key 'train.output_dir' is set by the sweep for each task"),
        ({"grid": {"train.lr": [0.1, 0.1]}}, "grid key 'train.lr' lists 0.1 more than once"),
        ({"fixed": {"train.epochs": 2}}, "nothing to sweep"),
        ({"fixed": {"train.lr": 1}, "grid": {"train.lr": [2]}}, "key 'train.lr' is in both 'fixed' and 'grid'"),
        ({"random": {"samples": 0, "choices": {"train.lr": [1]}}}, "random 'samples' must be an integer >= 1"),
        ({"random": {"samples": 2, "choices": {"train.nope": [1]}}}, "random choices key 'train.nope' is not a"),
        ({"base": "configs/missing.yaml", "grid": {"train.lr": [1]}}, "base config configs/missing.yaml does not"),
        ({"name": "a/b", "grid": {"train.lr": [1]}}, "'name' must be a folder name"),
    ],
)
def test_bad_sweep_files_get_one_line_naming_file_and_key(tmp_path: Path, capsys, body: dict, message: str) -> None:
    path = write_sweep(tmp_path, body)
    with pytest.raises(UserError) as info:
        load_sweep(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert main(["sweep", "plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("grid:\n  train.lr: [0.1, 0.2]\ngrid:\n  train.epochs: [1, 2]\n", "key 'grid' appears twice (lines 2 and 4)"),
        ("grid:\n  train.lr: [0.1, 0.2]\n  train.lr: [0.3]\n", "key 'train.lr' appears twice (lines 3 and 4)"),
        ("fixed: {train.epochs: 1, train.epochs: 2}\ngrid: {train.lr: [0.1]}\n", "key 'train.epochs' appears twice"),
    ],
)
def test_a_key_given_twice_in_a_sweep_file_is_refused(tmp_path: Path, capsys, text: str, message: str) -> None:
    """YAML keeps the last of two keys: half of the grid would silently never run."""
    path = tmp_path / "twice.yaml"
    path.write_text(f"base: {BASE}\n{text}")
    assert main(["sweep", "plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {message}") and err.endswith("; keep one\n") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"output_root": "runs/x\nmodel.name=resnet50", "grid": {"train.lr": [1]}}, "output_root holds a control"),
        ({"base": "configs/smoke.yaml\ntrain.epochs=40", "grid": {"train.lr": [1]}}, "base holds a control"),
        ({"fixed": {"model.pretrained": "a\tb"}, "grid": {"train.lr": [1]}}, "the value of 'model.pretrained' holds a"),
        ({"grid": {"wandb.entity": ["lab\u2028train.epochs=40"]}}, "the value of 'wandb.entity' holds a control"),
        ({"random": {"samples": 1, "choices": {"wandb.entity": ["x\x00y"]}}}, "the value of 'wandb.entity' holds"),
    ],
)
def test_control_characters_in_paths_and_values_are_refused(tmp_path: Path, body: dict, message: str) -> None:
    """slurm/sweep.sbatch once read one argument a line: a newline in output_root became extra overrides."""
    with pytest.raises(UserError) as info:
        load_sweep(write_sweep(tmp_path, body))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_sweeps_larger_than_a_slurm_array_are_refused_before_they_are_expanded(tmp_path: Path) -> None:
    grid = {"train.seed": list(range(501)), "train.lr": [0.1, 0.2]}
    with pytest.raises(UserError, match=r"1002 tasks \(501 x 2\) is more than a SLURM job array takes"):
        load_sweep(write_sweep(tmp_path, {"grid": grid}))
    assert len(load_sweep(write_sweep(tmp_path, {"grid": grid | {"train.lr": [0.1]}})).tasks) == 501
    # A billion random draws would fill the memory if they were drawn first.
    body = {"random": {"samples": 10**9, "choices": {"train.lr": [0.1, 0.2]}}}
    with pytest.raises(UserError, match=r"1000000000 tasks \(1000000000 samples\)"):
        load_sweep(write_sweep(tmp_path, body))


def test_an_array_task_validates_only_its_own_config(tmp_path: Path, monkeypatch, capsys) -> None:
    """Plan validates every task; `sweep args` runs once per task, and validating all of them each time made a
    1,000-task sweep cost every task seconds."""
    import skinlesion.sweep

    calls = []
    monkeypatch.setattr(skinlesion.sweep, "load_config", lambda *a: calls.append(a) or load_config(*a))
    path = write_sweep(tmp_path, {"output_root": str(tmp_path / "runs"), "grid": {"train.seed": list(range(40))}})
    assert main(["sweep", "args", str(path), "--task", "7"]) == 0
    assert len(calls) == 1 and "train.seed=7" in calls[0][1]
    assert capsys.readouterr().out.splitlines()[1] == "train.seed=7"
    assert main(["sweep", "plan", str(path)]) == 0 and len(calls) == 41


def test_args_with_null_ends_each_argument_with_a_nul_byte(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs with spaces" / "s"
    path = write_sweep(tmp_path, {"output_root": str(root), "grid": {"wandb.entity": ["it's $(x) *"]}})
    assert main(["sweep", "args", str(path), "--task", "0", "--null"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\0") and out[:-1].split("\0") == load_sweep(path).train_args(0)
    assert out[:-1].split("\0")[1] == "wandb.entity=it's $(x) *"


def test_sweep_sbatch_hands_the_step_each_argument_intact(tmp_path: Path) -> None:
    """slurm/sweep.sbatch with stand-ins for scontrol and srun: the training step gets exactly the task's arguments,
    whatever spaces, quotes or shell syntax they hold, and none of it is run."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(
        '#!/bin/sh\ncase "$2" in job) echo "   Command=$FAKE_COMMAND" ;; hostnames) echo node1 ;;\n'
        "node) echo 'NodeName=node1 NodeAddr=127.0.0.1' ;; esac\n"
    )
    (fake / "srun").write_text('#!/bin/sh\nprintf "%s\\0" "$@" >"$SRUN_ARGS"\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)
    fixed = {"wandb.entity": "it's $(touch pwned) *"}
    body = {"output_root": str(tmp_path / "runs dir" / "s"), "fixed": fixed, "grid": {"train.lr": [0.1, 0.2]}}
    path = write_sweep(tmp_path, body)
    slurm = {f"SLURM_{k}": v for k, v in (("JOB_ID", "7"), ("ARRAY_JOB_ID", "7"), ("ARRAY_TASK_ID", "1"))}
    slurm |= {"SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", "SLURM_SUBMIT_DIR": str(tmp_path)}
    env = (
        os.environ
        | slurm
        | {
            "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": str(REPO),
            "FAKE_COMMAND": f"{REPO}/slurm/sweep.sbatch {path}",
            "SRUN_ARGS": str(tmp_path / "srun.args"),
        }
    )
    script = [str(REPO / "slurm/sweep.sbatch"), str(path)]
    done = subprocess.run(["bash", *script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    args = (tmp_path / "srun.args").read_text().split("\0")[:-1]
    assert args[args.index("node_main") + 1 :] == load_sweep(path).train_args(1)
    assert not (tmp_path / "pwned").exists()


def test_the_printed_sbatch_line_is_shell_quoted(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "my sweeps; rm -rf ~"
    folder.mkdir()
    path = write_sweep(folder, {"output_root": str(tmp_path / "runs $HOME"), "grid": {"train.lr": [0.1, 0.2]}})
    assert main(["sweep", "plan", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    sbatch = next(line for line in lines if "mkdir -p logs && " in line).split(" && ")[1]
    assert shlex.split(sbatch) == ["sbatch", "--array=0-1%2", "slurm/sweep.sbatch", str(path)]
    assert shlex.split(lines[-1]) == ["then:", "skinlesion", "sweep", "summarize", str(tmp_path / "runs $HOME")]


def test_a_changed_sweep_under_the_same_name_is_refused(tmp_path: Path, capsys) -> None:
    """Task 1 of the changed file would resume task 1 of the old sweep with other settings."""
    root = tmp_path / "runs" / "s"
    path = write_sweep(tmp_path, {"output_root": str(root), "grid": {"train.lr": [1e-3, 2e-3]}})
    assert main(["sweep", "args", str(path), "--task", "0"]) == 0
    assert main(["sweep", "args", str(path), "--task", "1"]) == 0  # the same plan: fine
    path = write_sweep(tmp_path, {"output_root": str(root), "grid": {"train.lr": [5e-4, 1e-3, 2e-3]}})
    capsys.readouterr()
    for command in (["sweep", "plan", str(path)], ["sweep", "args", str(path), "--task", "1"]):
        assert main(command) == 2
        assert "holds a sweep with another plan" in capsys.readouterr().err
    assert json.loads((root / "sweep.json").read_text())["tasks"] == [["train.lr=0.001"], ["train.lr=0.002"]]


def test_missing_or_non_mapping_sweep_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"sweep file .*nope\.yaml does not exist"):
        load_sweep(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match=r"list\.yaml: a sweep file is a mapping"):
        load_sweep(tmp_path / "list.yaml")


def test_args_prints_one_argument_a_line_and_records_the_plan(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs" / "s"
    path = write_sweep(tmp_path, {"output_root": str(root), "grid": {"train.lr": [1e-3, 2e-3]}})
    assert main(["sweep", "args", str(path), "--task", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        BASE,
        "train.lr=0.002",
        f"train.output_dir={root}/1",
        "wandb.group=mysweep",
        "wandb.name=mysweep-1",
    ]
    plan = json.loads((root / "sweep.json").read_text())
    assert plan["tasks"] == [["train.lr=0.001"], ["train.lr=0.002"]]
    assert main(["sweep", "args", str(path), "--task", "2"]) == 2
    assert "task 2 does not exist; the sweep has tasks 0-1" in capsys.readouterr().err


def test_the_wandb_group_reaches_wandb_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Recorder:
        def init_trackers(self, project: str, config: dict, init_kwargs: dict) -> None:
            self.kwargs = init_kwargs["wandb"]

    # start_run points W&B's staging folder at the run (an environment variable): keep it inside this test
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb"))
    accelerator = Recorder()
    out = tmp_path / "lr-sweep" / "0"
    cfg = load_config(None, ["wandb.mode=offline", "wandb.group=lr-sweep", f"train.output_dir={out}"])
    tracking.start_run(accelerator, cfg, "abc123", {"train": {"lr": 0.1}})
    assert accelerator.kwargs["group"] == "lr-sweep" and accelerator.kwargs["id"] == "abc123"
    assert load_config(None).wandb.group is None


# --- summarize ---------------------------------------------------------------------------------------------------


def fake_run(run: Path, scores: list[float], epochs: int = 2, card: tuple[float, float, float] | None = None) -> None:
    """A run folder as training leaves it: config.yaml, metrics.jsonl so far and, when `card` is given, the files
    of a finished run (model.pt, eval/metrics.json, model_card.json with this validation score and interval)."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": epochs}, "runtime": {"world_size": 1}}))
    lines = [json.dumps({"epoch": i, "val_balanced_accuracy": s}) for i, s in enumerate(scores)]
    (run / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines))
    if card:
        (run / "model.pt").write_bytes(b"weights")
        (run / "eval").mkdir()
        (run / "eval" / "metrics.json").write_text("{}")
        validation = {"balanced_accuracy": card[0], "balanced_accuracy_ci95": [card[1], card[2]]}
        (run / "model_card.json").write_text(json.dumps({"validation": validation}))


def test_summarize_ranks_finished_runs_and_marks_the_others(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs" / "lr"
    tasks = [[f"train.lr={lr}"] for lr in ("0.001", "0.002", "0.003", "0.004", "0.005")]
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({"name": "lr", "tasks": tasks}))
    fake_run(root / "0", [0.4, 0.6], card=(0.6, 0.5, 0.7))
    fake_run(root / "1", [0.7, 0.8], card=(0.8, 0.72, 0.88))
    fake_run(root / "2", [0.9])  # higher, but unfinished: listed after the finished runs, without a rank
    fake_run(root / "3", [0.3])
    (root / "3" / "failed").write_text("exit status 1 of job 7_3 at 2026-01-01 00:00:00; see its log\n")
    # task 4 never started: no folder

    assert summarize_command(root) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((root / "leaderboard.csv").open()))
    assert [(r["rank"], r["task"], r["status"]) for r in rows] == [
        ("1", "1", "finished"),
        ("2", "0", "finished"),
        ("-", "2", "unfinished"),
        ("-", "3", "failed"),
        ("-", "4", "not started"),
    ]
    assert (rows[0]["ci95_low"], rows[0]["ci95_high"], rows[0]["overrides"]) == ("0.72", "0.88", "train.lr=0.002")
    assert rows[0]["best_epoch"] == "1" and rows[0]["epochs"] == "2/2"
    assert rows[2]["score"] == "0.9" and rows[2]["ci95_low"] == "" and rows[2]["epochs"] == "1/2"
    assert {r["metric"] for r in rows} == {"val_balanced_accuracy"}  # runs that do not name theirs: the default
    assert "exit status 1 of job 7_3" in rows[3]["note"]
    markdown = (root / "leaderboard.md").read_text()
    assert markdown == printed.split("\nwrote ")[0]
    assert "| 1 | 1 | 0.800 (0.720-0.880) | finished |" in markdown and "| **failed** |" in markdown
    assert "5 runs: 2 finished, 1 unfinished, 1 failed, 1 not started." in markdown
    assert (root / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_summarize_reads_metrics_cut_short_and_notes_damaged_ones_without_rewriting_them(tmp_path, capsys) -> None:
    fake_run(tmp_path / "0", [0.4, 0.6])
    fake_run(tmp_path / "1", [0.5, 0.7])
    cut, damaged = tmp_path / "0" / "metrics.jsonl", tmp_path / "1" / "metrics.jsonl"
    with cut.open("a") as f:
        f.write('{"epoch": 2, "val_balanced_acc')  # the run crashed (or is writing) mid-append
    damaged.write_text(damaged.read_text().replace('"epoch": 0', '"epoch": 0 oops'))
    before = cut.read_bytes(), damaged.read_bytes()
    rows = {r.task: r for r in summarize(tmp_path)}
    assert (rows["0"].score, rows["0"].epochs) == (0.6, "2/2")
    assert "dropped its last line" in capsys.readouterr().err
    assert rows["1"].score is None and f"{damaged}, line 1: not a JSON record" in rows["1"].note
    assert (cut.read_bytes(), damaged.read_bytes()) == before  # a reader never rewrites a run's file


def test_summarize_without_a_plan_labels_runs_by_the_keys_that_differ(tmp_path: Path) -> None:
    for name, lr, score in (("a", 0.1, 0.5), ("b", 0.2, 0.6)):
        fake_run(tmp_path / name, [score], epochs=1, card=(score, score - 0.1, score + 0.1))
        config = {"train": {"epochs": 1, "lr": lr, "output_dir": f"runs/{name}"}, "model": {"name": "resnet18"}}
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(config))
    rows = summarize(tmp_path)
    assert [(r.task, r.overrides) for r in rows] == [("b", "train.lr=0.2"), ("a", "train.lr=0.1")]


def kept_by_run(run: Path, metric: str, values: list[float], card: tuple[float, float, float] | None = None) -> None:
    """A run whose best.pt was kept by `metric` (metrics.jsonl's best_pt_metric), with a balanced accuracy that
    falls while `metric` improves, so a leaderboard that ranked by balanced accuracy would pick other epochs."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": len(values)}}))
    records = [
        {"epoch": i, "val_balanced_accuracy": 0.9 - 0.1 * i, metric: v, "best_pt_metric": metric}
        for i, v in enumerate(values)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if card:
        (run / "model.pt").write_bytes(b"weights")
        (run / "eval").mkdir()
        (run / "eval" / "metrics.json").write_text("{}")
        validation = {"balanced_accuracy": 0.99, "balanced_accuracy_ci95": [0.98, 1.0]}
        if metric == "val_auc":
            validation |= {"auc": card[0], "auc_ci95": [card[1], card[2]]}
        chosen = {"metric": metric, "value": card[0], "keeps": "lowest" if metric == "val_loss" else "highest"}
        (run / "model_card.json").write_text(json.dumps({"validation": validation, "best_pt_selection": chosen}))


def test_binary_runs_are_ranked_by_the_auc_their_best_pt_was_kept_by(tmp_path: Path, capsys) -> None:
    kept_by_run(tmp_path / "0", "val_auc", [0.6, 0.7], card=(0.7, 0.6, 0.8))
    kept_by_run(tmp_path / "1", "val_auc", [0.8, 0.9], card=(0.9, 0.85, 0.95))
    kept_by_run(tmp_path / "2", "val_auc", [0.95])  # unfinished: listed, not ranked
    kept_by_run(tmp_path / "3", "val_loss", [0.5, 0.3], card=(0.3, 0.3, 0.3))  # AUC undefined on its shards
    assert summarize_command(tmp_path) == 0
    rows = list(csv.DictReader((tmp_path / "leaderboard.csv").open()))
    got = [(r["rank"], r["task"], r["metric"], r["score"], r["ci95_low"], r["best_epoch"]) for r in rows]
    assert got == [
        ("1", "1", "val_auc", "0.9", "0.85", "1"),
        ("2", "0", "val_auc", "0.7", "0.6", "1"),
        ("-", "3", "val_loss", "0.3", "", "1"),  # the lowest loss is its best epoch; no rank beside AUCs
        ("-", "2", "val_auc", "0.95", "", "0"),
    ]
    assert rows[2]["note"] == "scored by val_loss, not val_auc: not ranked"
    markdown = capsys.readouterr().out
    assert "| rank | task | val AUC (95% CI) |" in markdown and "(val_auc, highest first)" in markdown
    assert "| - | 3 | 0.300 (no CI) (val_loss) | finished |" in markdown


def test_runs_written_before_val_auc_was_recorded_are_scored_from_the_cards_selection(tmp_path: Path) -> None:
    """metrics.jsonl named val_auc without holding it, and the card had no `auc`: its best_pt_selection has it."""
    kept_by_run(tmp_path / "0", "val_auc", [0.6, 0.7], card=(0.7, 0.6, 0.8))
    kept_by_run(tmp_path / "1", "val_auc", [0.8, 0.9], card=(0.9, 0.85, 0.95))
    for run in (tmp_path / "0", tmp_path / "1"):
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r | {"val_auc": None}) + "\n" for r in lines))
    card = json.loads((tmp_path / "1" / "model_card.json").read_text())
    del card["validation"]["auc"], card["validation"]["auc_ci95"]
    (tmp_path / "1" / "model_card.json").write_text(json.dumps(card))
    del card["best_pt_selection"]
    (tmp_path / "0" / "model_card.json").write_text(json.dumps(card))
    rows = summarize(tmp_path)
    assert [(r.task, r.score, r.ci, r.ranked) for r in rows] == [("1", 0.9, None, True), ("0", None, None, False)]
    assert "`skinlesion evaluate --split val` on its best.pt rewrites the card" in rows[1].note


@pytest.mark.parametrize(
    ("card", "score"),
    [
        ({"validation": [1], "best_pt_selection": "val_auc"}, 0.6),  # from metrics.jsonl
        ({"validation": {"balanced_accuracy": "0.9", "balanced_accuracy_ci95": "ab"}}, 0.6),
        ({"validation": {"balanced_accuracy": float("nan")}}, 0.6),
        ({"validation": {"balanced_accuracy": 0.9, "balanced_accuracy_ci95": [0.8, 0.9, 1.0]}}, 0.9),  # no interval
    ],
)
def test_a_damaged_card_costs_its_run_the_cards_figures_not_the_table(tmp_path: Path, card, score) -> None:
    fake_run(tmp_path / "0", [0.4, 0.6], card=(0.6, 0.5, 0.7))
    (tmp_path / "0" / "model_card.json").write_text(json.dumps(card))
    (row,) = summarize(tmp_path)
    assert (row.status, row.score, row.ci, row.best_epoch) == ("finished", score, None, 1)
    assert ("best epoch from metrics.jsonl, no interval" in row.note) == (score == 0.6)


def test_runs_kept_by_the_lowest_validation_loss_are_ranked_lowest_first(tmp_path: Path) -> None:
    kept_by_run(tmp_path / "0", "val_loss", [0.5, 0.4], card=(0.4, 0.4, 0.4))
    kept_by_run(tmp_path / "1", "val_loss", [0.3, 0.2], card=(0.2, 0.2, 0.2))
    rows = summarize(tmp_path)
    assert [(r.task, r.score, r.ranked, r.ci) for r in rows] == [("1", 0.2, True, None), ("0", 0.4, True, None)]
    kept_by_run(tmp_path / "2", "\x1b[2Jpwned", [0.1, 0.2])  # a name training never writes: the default metric
    assert next(r for r in summarize(tmp_path) if r.task == "2").metric == "val_balanced_accuracy"


def test_summarize_errors(tmp_path: Path, capsys) -> None:
    assert main(["sweep", "summarize", str(tmp_path / "none")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["sweep", "summarize", str(tmp_path)]) == 2
    assert f"{tmp_path} holds no runs" in capsys.readouterr().err


# --- on the local SLURM cluster ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_shards(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """84 train samples (12 per class) at 32 px, ~40 each for val and test: the shards test_slurm.py's jobs use."""
    from skinlesion.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("sweep-shards") / "shards"
    images = tuple(synthetic_dir / f"HAM10000_images_part_{i}" for i in (1, 2))
    meta = synthetic_dir / "HAM10000_metadata.csv"
    prepare(
        PrepareOptions(
            metadata=meta,
            images=images,
            out=out,
            image_size=32,
            samples_per_class=12,
            val_fraction=0.1,
            test_fraction=0.1,
            min_shards=2,
            workers=1,
        )
    )
    return out


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(1800)  # its waits add up to 22 minutes on a busy cluster
def test_job_array_task_preempted_requeues_alone_and_the_sweep_finishes(
    cluster: Cluster, tiny_shards: Path, tmp_path: Path
) -> None:
    root = tmp_path / "runs" / "tiny"
    fixed = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in TINY)}
    fixed |= {"data.shards": str(tiny_shards), "wandb.mode": "disabled"}
    # Task 3 (lr 2e-3, 4 epochs) is the one preempted: the last task of an array holds the array's own job id,
    # whose plain `scontrol requeue` would requeue every task.
    body = {
        "output_root": str(root),
        "max_parallel": 2,
        "fixed": fixed,
        "grid": {"train.lr": [1e-3, 2e-3], "train.epochs": [1, 4]},
    }
    sweep_file = write_sweep(tmp_path, body, name="tiny")
    array, done = cluster.submit(
        "--array=0-3%2", "slurm/sweep.sbatch", str(sweep_file), log_dir=tmp_path, log_name="%x-%A_%a.out"
    )
    assert done.returncode == 0, done.stderr
    tasks = [f"{array}_{i}" for i in range(4)]
    # SLURM forgets a finished job after MinJobAge (16 s on the local cluster), so every wait below records each
    # task's latest state while it is still known.
    last: dict[str, dict[str, str]] = {}

    def state(task: str, key: str = "JobState") -> str | None:
        last.update({t: info for t in tasks if (info := job_info(t))})
        return last.get(task, {}).get(key)

    started = root / "3" / "metrics.jsonl"
    wait_for(lambda: state(tasks[3]) in FINISHED or started.is_file(), 420, f"epoch 0 of {tasks[3]}")
    assert started.is_file(), job_log(tmp_path, tasks[3])[-4000:]
    subprocess.run(["scancel", "--signal=USR1", "--batch", tasks[3]], check=True, timeout=20)
    wait_for(lambda: int(state(tasks[3], "Restarts") or 0) >= 1, 180, f"{tasks[3]} to requeue itself")
    wait_for(lambda: state(tasks[3]) in ("PENDING", "REQUEUED"), 120, f"{tasks[3]} to be pending again")
    time.sleep(2)  # see test_slurm.py: a release within the second of the requeue is refused
    subprocess.run(["scontrol", "update", f"jobid={tasks[3]}", "StartTime=now"], check=True, timeout=20)
    wait_for(lambda: all(state(t) in FINISHED for t in tasks), 600, f"array {array} to finish")

    logs = {t: job_log(tmp_path, t) for t in tasks}
    assert [last[t]["JobState"] for t in tasks] == ["COMPLETED"] * 4, logs[tasks[3]][-4000:]
    assert [int(last[t]["Restarts"]) for t in tasks] == [0, 0, 0, 1]  # the preempted task alone came back
    assert [log.count("(restart 1)") for log in logs.values()] == [0, 0, 0, 1]
    assert f"requeueing job {tasks[3]}" in logs[tasks[3]] and "(restart 1)" in logs[tasks[3]]
    assert "resuming from" in logs[tasks[3]]
    epochs = [json.loads(line)["epoch"] for line in (root / "3" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]

    done = subprocess.run(
        [sys.executable, "-m", "skinlesion", "sweep", "summarize", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert "4 runs: 4 finished, 0 unfinished, 0 failed, 0 not started." in done.stdout
    rows = list(csv.DictReader((root / "leaderboard.csv").open()))
    assert sorted(r["rank"] for r in rows) == ["1", "2", "3", "4"]
    assert all(r["status"] == "finished" and r["ci95_low"] and r["ci95_high"] for r in rows)
    planned = {f"train.lr={lr} train.epochs={e}" for lr in (0.001, 0.002) for e in (1, 4)}
    assert {r["overrides"] for r in rows} == planned
