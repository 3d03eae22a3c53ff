"""`skinlesion bench` prints its table and writes the documented JSON keys; the GPU check runs on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_SAMPLE
from helpers import REPO

from skinlesion.cli import main


def _run(capsys: pytest.CaptureFixture, tmp_path: Path, *args: str) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    assert main(["bench", *args, "--json", str(out)]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


@pytest.mark.parametrize("augment", ["device", "cpu"])
def test_bench_loader_reports_the_breakdown(shards_dir: Path, tmp_path: Path, capsys, augment: str) -> None:
    text, result = _run(
        capsys,
        tmp_path,
        "loader",
        "--shards",
        str(shards_dir),
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--batches",
        "3",
        "--workers",
        "0",
        "--augment",
        augment,
    )
    assert {
        "augment",
        "decode",
        "image_size",
        "workers",
        "batch_size",
        "images",
        "images_per_second_per_worker",
        "ms_per_image",
        "bytes_per_image",
        "device_augment_ms_per_batch",
    } <= set(result)
    assert set(result["ms_per_image"]) == {"read", "decode", "crop", "collate", "total"}
    assert result["images"] == 24 and result["augment"] == augment and result["decode"] == "cpu"
    # uint8 tiles plus a 2x3 float affine, against normalised float32: the 1/4 that crosses PCIe.
    assert result["bytes_per_image"] == (3 * 32 * 32 + 24 if augment == "device" else 3 * 32 * 32 * 4)
    assert (result["device_augment_ms_per_batch"] is None) == (augment == "cpu")
    assert result["device_decode_ms_per_batch"] is None
    assert "ms per image on one core" in text


def test_bench_loader_with_device_decode_measures_the_worker_and_the_device_halves(
    shards_dir: Path, tmp_path: Path, capsys
) -> None:
    args = ["--shards", str(shards_dir), "--image-size", "32", "--batch-size", "8", "--batches", "3", "--workers", "0"]
    text, result = _run(capsys, tmp_path, "loader", *args, "--decode", "device")
    assert result["decode"] == "device" and result["images"] == 24
    assert result["device_decode_ms_per_batch"] > 0 and result["device_augment_ms_per_batch"] > 0
    # The JPEG bytes plus offset, size, box and affine: no decoded pixels leave the worker.
    assert 8 + 16 + 32 + 24 < result["bytes_per_image"] < 3 * 32 * 32
    assert "device decode" in text and "device decode, device augmentation" in text
    assert main(["bench", "loader", *args, "--decode", "device", "--augment", "cpu"]) == 2
    assert "data.decode=device needs data.augment=device" in capsys.readouterr().err


def test_bench_step_reports_images_per_second(tmp_path: Path, capsys) -> None:
    text, result = _run(
        capsys, tmp_path, "step", "--model", "resnet18", "--image-size", "32", "--batch-size", "4", "--steps", "1"
    )
    assert {
        "device",
        "model",
        "image_size",
        "batch_size",
        "precision",
        "channels_last",
        "compile",
        "images_per_second",
    } <= set(result)
    assert result["images_per_second"] > 0 and "images/s" in text


def test_bench_train_compares_end_to_end_with_step_only(shards_dir: Path, tmp_path: Path, capsys) -> None:
    smoke = str(REPO / "configs/smoke.yaml")
    _, result = _run(
        capsys,
        tmp_path,
        "train",
        "--config",
        smoke,
        f"data.shards={shards_dir}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "--steps",
        "3",
    )
    assert {"images_per_second", "step_images_per_second", "input_bound_fraction"} <= set(result)
    assert 0 <= result["input_bound_fraction"] <= 1


def test_fp16_on_the_cpu_is_a_clear_error(capsys) -> None:
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "step", "--precision", "fp16"]) == 2
    assert "fp16 needs a GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_runs_scaled_down_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "check"
    done = subprocess.run(
        [str(REPO / "benchmarks/gpu-check.sh"), "--cpu", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu" and len(summary["training"]["train_loss"]) == 2
    assert summary["data"].startswith("real content" if (SHARED_SAMPLE / "images").is_dir() else "synthetic")
    assert set(summary["loader"]) == {"device", "cpu", "device_decode"} and set(summary["train"]) == {
        "device",
        "cpu",
        "device_decode",
    }
    assert summary["loader"]["device_decode"]["device_decode_max_abs_diff"] == 0  # same decoder on the CPU
    # The shipped recipe under accelerate launch, against bench step at its settings; no SM % on a CPU.
    recipe = summary["recipe"]
    assert {"images_per_second", "step_images_per_second", "ratio_to_step", "sm_busy", "compile_seconds"} <= set(recipe)
    assert recipe["ratio_to_step"] > 0 and recipe["sm_busy"] is None and recipe["compile_seconds"] is None
    assert "skipped" in summary["recipe_compile"]
    text = (out / "summary.md").read_text()
    assert "| bench train, device decode path" in text and "| recipe (configs/ham10000.yaml under accelerate" in text


@pytest.mark.slow
def test_gpu_loop_runs_scaled_down_on_the_cpu(tmp_path: Path) -> None:
    env = os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(REPO / "benchmarks/gpu-loop.sh"), "--cpu", str(tmp_path / "loop")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "bench train:" in done.stdout and "train.py plain: images/s per epoch" in done.stdout
    recipe = [json.loads(line) for line in (tmp_path / "loop" / "metrics-recipe.jsonl").read_text().splitlines()]
    assert len(recipe) == 2 and all("val_balanced_accuracy_raw" in r for r in recipe)  # the EMA was on


def test_gpu_check_without_a_gpu_says_to_use_cpu_mode(tmp_path: Path) -> None:
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run(
        [str(REPO / "benchmarks/gpu-check.sh"), str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHON": sys.executable},
    )
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr and "--cpu" in done.stderr


@pytest.mark.parametrize("name", ["prepare", "files", "harness", "predict", "serve", "checks"])
def test_the_baseline_benchmarks_are_under_skinlesion_bench(name: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", name, "--help"])
    assert exited.value.code == 0 and f"usage: skinlesion bench {name}" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_harness_times_the_real_trainer_against_a_bare_loop(shards_dir: Path, capsys) -> None:
    """It patches the trainer's loader, manifest and validation for its run, and leaves them as they were."""
    import skinlesion.train as T

    before = (T.train_loader, T.read_manifest, T.verify_split, T.validate, T.train_epoch)
    assert main(
        [
            "bench",
            "harness",
            "--shards",
            str(shards_dir),
            "--steps",
            "2",
            "--repeats",
            "1",
            "--batch-size",
            "4",
            "--image-size",
            "32",
        ]
    ) in (0, None)
    assert "ratio harness / bare" in capsys.readouterr().out
    assert (T.train_loader, T.read_manifest, T.verify_split, T.validate, T.train_epoch) == before


def test_bench_files_compares_shards_with_jpeg_files(shards_dir: Path, capsys) -> None:
    assert (
        main(
            [
                "bench",
                "files",
                "--shards",
                str(shards_dir),
                "--image-size",
                "32",
                "--batch-size",
                "8",
                "--workers",
                "0",
                "--repeats",
                "1",
            ]
        )
        == 0
    )
    assert "ratio shards / jpeg files" in capsys.readouterr().out
