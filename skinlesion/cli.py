"""The `skinlesion` command: parse arguments, call one stage, print its summary.

Stage modules are imported only when their subcommand runs, so `skinlesion synth --help` does not
pay for importing torch. A `UserError` from any stage is printed as one line (no traceback) and
exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from skinlesion import __version__
from skinlesion.errors import UserError


def _synth(args: argparse.Namespace) -> int:
    if args.layout != "ham10000":
        from skinlesion.data.synthetic_isic import generate_isic

        generate_isic(args.dir, args.layout, n_images=args.images, seed=args.seed, overwrite=args.overwrite)
        return 0
    from skinlesion.data.synthetic import generate

    generate(args.dir, n_images=args.images, seed=args.seed, overwrite=args.overwrite)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from skinlesion.data.prepare import PrepareOptions, prepare

    prepare(
        PrepareOptions(
            metadata=args.metadata,
            images=tuple(args.images),
            out=args.out,
            samples_per_class=args.samples_per_class,
            image_size=args.image_size,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            keep_incomplete=args.keep_incomplete,
            on_bad_image=args.on_bad_image,
            overwrite=args.overwrite,
            samples_per_shard=args.samples_per_shard,
            min_shards=args.min_shards,
            workers=args.workers,
            dataset=args.dataset,
            labels=args.labels,
            duplicates=args.duplicates,
            spec=args.spec,
            columns=tuple(_column(c) for c in args.column),
            malignant=tuple(m for arg in args.malignant for m in arg.split(",") if m),
            add_ham10000=args.add_ham10000,
            allow_ungrouped=args.allow_ungrouped,
        )
    )
    return 0


def _column(arg: str) -> tuple[str, str]:
    key, sep, name = arg.partition("=")
    keys = ("image_id", "label", "group", "age", "sex", "site", "dx_type")
    if not sep or key not in keys or not name:
        raise UserError(f"--column {arg!r}: write KEY=CSV_COLUMN with KEY one of {', '.join(keys)}")
    return key, name


def _train(args: argparse.Namespace) -> int:
    from skinlesion.config import load_config
    from skinlesion.train import train

    train(load_config(args.config, args.overrides))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    if args.sweep == "summarize":
        from skinlesion.leaderboard import summarize_command

        return summarize_command(args.folder, args.out)
    from skinlesion.sweep import args_command, plan_command

    return plan_command(args.file) if args.sweep == "plan" else args_command(args.file, args.task, args.null)


def _evaluate(args: argparse.Namespace) -> int:
    from skinlesion.eval_checkpoint import evaluate_command

    return evaluate_command(
        args.checkpoint, args.shards, split=args.split, out=args.out, tta=args.tta, image_size=args.image_size
    )


def _predict(args: argparse.Namespace) -> int:
    from skinlesion.predict import predict_command

    return predict_command(
        args.checkpoint, args.images, top_k=args.top_k, as_json=args.json, tta=args.tta, image_size=args.image_size
    )


IMAGE_SIZE_HELP = "input size, only for a plain state_dict that does not record it (skinlesion's files do)"


def _serve(args: argparse.Namespace) -> int:
    from skinlesion.serve import serve_command

    return serve_command(
        args.checkpoint,
        args.host,
        args.port,
        args.token,
        args.device,
        args.max_mb,
        args.max_files,
        args.batch,
        tuple(args.allow_host),
    )


def _bench(args: argparse.Namespace) -> int:
    if args.bench in BASELINES:  # the benchmarks against outside baselines take their own arguments
        import importlib

        importlib.import_module(f"skinlesion.baselines.{args.bench}").main(args.rest)
        return 0
    from skinlesion.bench import bench_command

    return bench_command(args.bench, args)


BASELINES = {
    "prepare": "prepare vs a single-process decode/resize/encode loop",
    "files": "the shard loader vs JPEG files through torchvision's ImageFolder",
    "harness": "skinlesion's training step vs a bare PyTorch loop",
    "predict": "predict in batches vs one image at a time",
    "serve": "serve's latency, and its load with batching vs one image at a time",
    "checks": "the page's OOD score and Grad-CAM stage against their alternatives",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skinlesion",
        description="Distributed training harness for dermoscopic skin-lesion classification (HAM10000).",
    )
    parser.add_argument("--version", action="version", version=f"skinlesion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic HAM10000-style dataset (metadata CSV + JPEGs)")
    p.add_argument("dir", type=Path, help="output folder")
    p.add_argument("--images", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a synthetic dataset already in DIR")
    p.add_argument(
        "--layout",
        choices=("ham10000", "isic2019", "isic2020"),
        default="ham10000",
        help="whose published file layout to write (default ham10000)",
    )
    p.set_defaults(func=_synth)

    p = sub.add_parser("prepare", help="metadata + image folders -> clean, split, balanced WebDataset shards")
    p.add_argument("--metadata", type=Path, required=True, help="HAM10000_metadata.csv (or the dataset's metadata)")
    p.add_argument(
        "--dataset",
        choices=("ham10000", "isic2019", "isic2020", "custom"),
        default="ham10000",
        help="the dataset description (docs/data.md); default ham10000",
    )
    p.add_argument("--labels", type=Path, default=None, help="isic2019: ISIC_2019_Training_GroundTruth.csv")
    p.add_argument("--duplicates", type=Path, default=None, help="isic2020: ISIC_2020_Training_Duplicates.csv")
    p.add_argument("--spec", type=Path, default=None, help="custom: a YAML dataset description")
    p.add_argument(
        "--add-ham10000",
        type=Path,
        default=None,
        metavar="CSV",
        help="isic2019: also HAM10000_metadata.csv (its images via --images), de-duplicated by image id",
    )
    p.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="KEY=NAME",
        help="custom: a CSV column, e.g. label=diagnosis (repeatable; overrides --spec)",
    )
    p.add_argument(
        "--malignant", action="append", default=[], metavar="A,B", help="custom without --spec: the malignant labels"
    )
    p.add_argument(
        "--allow-ungrouped",
        action="store_true",
        help="the CSV has no lesion/patient column: split image by image (recorded in the manifest)",
    )
    p.add_argument("--images", type=Path, action="append", required=True, help="image folder (repeatable)")
    p.add_argument("--out", type=Path, default=Path("shards"), help="output folder (default shards/)")
    p.add_argument("--samples-per-class", type=int, default=None, help="resample each train class to N")
    p.add_argument("--image-size", type=int, default=256, help="shorter side in px; 0 keeps original bytes")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-incomplete", action="store_true", help="keep rows with null age or 'unknown'")
    p.add_argument("--on-bad-image", choices=("skip", "error"), default="skip")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.add_argument("--samples-per-shard", type=int, default=None, help="cap on samples per shard")
    p.add_argument("--min-shards", type=int, default=32, help="least shards per split (ranks x workers; default 32)")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="train a classifier (also under accelerate launch / torchrun)")
    p.add_argument("--config", type=Path, required=True, help="YAML recipe, e.g. configs/smoke.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")
    p.set_defaults(func=_train)

    _add_sweep(sub)

    p = sub.add_parser("evaluate", help="clinical metrics, predictions.csv and plots for a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True, help="model.pt or best.pt")
    p.add_argument("--shards", type=Path, required=True, help="folder written by `skinlesion prepare`")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: beside the checkpoint)")
    p.add_argument("--tta", action="store_true", help="average flips and 90-degree rotations")
    p.add_argument("--image-size", type=int, default=None, help=IMAGE_SIZE_HELP)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="diagnostic suggestions for images (decision support)")
    p.add_argument("--checkpoint", type=Path, required=True, help="model.pt or best.pt")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=None, help="how many diagnoses to list (default: 3, or all if fewer)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--tta", action="store_true", help="average flips and 90-degree rotations")
    p.add_argument("--image-size", type=int, default=None, help=IMAGE_SIZE_HELP)
    p.set_defaults(func=_predict)
    p = sub.add_parser("serve", help="the dermatologist's web page and JSON API for a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt (with model_card.json + ood.pt beside it)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (or set SKINLESION_TOKEN)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--max-mb", type=float, default=20.0, help="largest image accepted, MB (default 20)")
    p.add_argument("--max-files", type=int, default=20, help="most images per request (default 20)")
    p.add_argument("--batch", type=int, default=8, help="images per shared forward pass (default 8; 1 = no batching)")
    allow = (
        "without --token, also answer requests addressed to NAME, an exact host name or IP address without port or "
        "wildcard (repeatable; localhost and --host always are)"
    )
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME", help=allow)
    p.set_defaults(func=_serve)
    _add_bench(sub)
    return parser


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="hyperparameter sweeps as SLURM job arrays: plan, args, summarize")
    kinds = p.add_subparsers(dest="sweep", required=True, metavar="ACTION")
    plan = kinds.add_parser("plan", help="validate a sweep file; print its numbered override sets and the sbatch line")
    plan.add_argument("file", type=Path, help="sweep file, e.g. configs/sweeps/smoke-lr-ls.yaml")
    args = kinds.add_parser("args", help="one task's training arguments, one a line (used by slurm/sweep.sbatch)")
    args.add_argument("file", type=Path, help="sweep file")
    args.add_argument("--task", type=int, required=True, help="task number ($SLURM_ARRAY_TASK_ID)")
    args.add_argument("--null", action="store_true", help="end each argument with a NUL byte, not a newline")
    summary = kinds.add_parser("summarize", help="leaderboard of a sweep folder: CSV, Markdown and a plot")
    summary.add_argument("folder", type=Path, help="the sweep's output folder, e.g. runs/smoke-lr-ls")
    summary.add_argument("--out", type=Path, default=None, help="where to write leaderboard.* (default: FOLDER)")
    for parser in (plan, args, summary):
        parser.set_defaults(func=_sweep)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure the loader, the training step and end-to-end training")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="KIND")
    loader = kinds.add_parser("loader", help="CPU cost per image by stage, images/s per worker, bytes shipped")
    loader.add_argument("--shards", type=Path, required=True, help="folder written by `skinlesion prepare`")
    loader.add_argument("--image-size", type=int, default=224)
    loader.add_argument("--workers", type=int, default=1)
    loader.add_argument("--batches", type=int, default=20)
    loader.add_argument("--batch-size", type=int, default=32)
    loader.add_argument("--augment", choices=("device", "cpu"), default="device")
    loader.add_argument("--decode", choices=("cpu", "device"), default="cpu", help="device: workers ship JPEG bytes")
    step = kinds.add_parser("step", help="images/s of forward + backward + optimizer step on in-memory batches")
    step.add_argument("--model", default="resnet50")
    step.add_argument("--image-size", type=int, default=224)
    step.add_argument("--batch-size", type=int, default=32)
    step.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    step.add_argument("--channels-last", action="store_true")
    step.add_argument("--compile", action="store_true")
    step.add_argument("--steps", type=int, default=10, help="steps per timed window (5 windows, median)")
    train = kinds.add_parser("train", help="end-to-end training images/s against `bench step` with the same settings")
    train.add_argument("--config", type=Path, required=True)
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.add_argument("--steps", type=int, default=50)
    for parser in (loader, step, train):
        parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
        parser.set_defaults(func=_bench)
    for name, what in BASELINES.items():
        kinds.add_parser(name, help=what, add_help=False)  # dispatched before parsing: see main()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BASELINES:
        # These parse their own arguments (argparse.REMAINDER would not pass a leading --help through).
        args = argparse.Namespace(bench=argv[1], rest=argv[2:], func=_bench)
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
