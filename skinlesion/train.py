"""The training loop: one Accelerate DDP loop from a laptop CPU to a SLURM cluster.

Read `train` top to bottom. `setup` prepares the output folder, reads the manifest once, forms the process
group and builds the model, optimizer and loss. `resume` continues from the newest checkpoint or starts
fresh. `fit` runs per epoch `train_epoch` (the optimizer step fits on one screen), then `validate` and
best.pt. `finish` exports model.pt and evaluates best.pt on the test split through `evaluate_checkpoint`,
the function behind `skinlesion evaluate`, then writes the model card.

Every rank runs the same number of steps (the loader guarantees it), and only the main process writes files
other than checkpoints. The step reads nothing back from the device: ranks agree whether to stop (preemption
signal) or fail (non-finite loss) every ``train.log_every_steps`` steps and before every save (`StepCheck`), so
the CPU queues step k+1 while the GPU still runs step k. One loader serves every epoch of the run, so its
workers start once.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from skinlesion import tracking, tracking_eval
from skinlesion.card import calibrate
from skinlesion.checkpoint import (
    TrainerState,
    bare_state_dict,
    complete_checkpoints,
    export_best,
    export_model,
    load_checkpoint,
    save_checkpoint,
)
from skinlesion.config import Config, TrainConfig, save_config
from skinlesion.data.batches import resolve_augment
from skinlesion.data.datasets import of_manifest
from skinlesion.data.device_decode import resolve_decode
from skinlesion.data.manifest import read_manifest, verify_split
from skinlesion.data.pipeline import batches_per_rank, eval_loader, train_loader
from skinlesion.data.workers import resolve_workers
from skinlesion.distributed import (
    StepCheck,
    StopSignal,
    lock_on_main,
    make_accelerator,
    runtime_info,
)
from skinlesion.ema import EMA, make_ema
from skinlesion.epoch import epoch_line, train_epoch, validate
from skinlesion.errors import UserError
from skinlesion.eval_checkpoint import evaluate_checkpoint
from skinlesion.evaluate import EvalResult
from skinlesion.facts import ModelFacts
from skinlesion.files import FolderLock, atomic_write, no_room_is_user_error, output_folder, read_jsonl
from skinlesion.losses import make_criterion
from skinlesion.metrics import LOWER_IS_BETTER, selection
from skinlesion.mixing import Mixer, make_mixer
from skinlesion.model import build_model, init_from, load_for_inference
from skinlesion.optim import make_optimizer, scaled_schedule


@dataclass
class Run:
    """What `setup` prepares for the later stages: the settings, the manifest (read once, so a whole run
    sees one version of the shards folder), the process group, the model and its optimizer and loss, and
    the fixed geometry of an epoch."""

    cfg: Config
    out: Path
    manifest: dict[str, Any]
    accelerator: Accelerator
    lock: FolderLock  # the output folder's: one writer
    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    stop: StopSignal
    check: StepCheck  # the loss's health and the stop signal, read every train.log_every_steps steps
    schedule: TrainConfig  # cfg.train with lr and ema_decay scaled to the global batch (train.reference_batch)
    batches: int  # per rank per epoch
    augment: str  # where per-pixel augmentation runs: "device" (uint8 batches) or "cpu" (loader workers)
    decode: str  # where training JPEGs are decoded: "device" (data.decode, on CUDA) or "cpu" (loader workers)
    mixer: Mixer | None  # MixUp/CutMix on a share of the device batches (train.mix_prob > 0)
    ema: EMA | None  # the weights' moving average (train.ema_decay > 0): validated and exported
    total_steps: int
    warmup_steps: int
    facts: ModelFacts  # what best.pt and model.pt carry: arch, classes, image size, shard size and JPEG quality
    compiled: nn.Module | None = None  # torch.compile(model), made at the first unfrozen epoch (train.compile)
    compile_seconds: float | None = None  # wall time of the first compiled step: the compile itself

    @property
    def shipped(self) -> nn.Module:
        """The weights that validation, best.pt and model.pt see: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def has(self, split: str) -> bool:
        return bool(self.manifest["splits"].get(split, {}).get("samples"))


def train(cfg: Config) -> Path:
    """Train per `cfg`; returns the output folder (model.pt, best.pt, metrics.jsonl, config.yaml, checkpoints/)."""
    run = setup(cfg)
    kept = "its newest complete checkpoint is kept; free space and resume with train.resume=auto"
    try:
        with no_room_is_user_error(run.out, "train.output_dir", kept):  # metrics, eval files, exports
            state = resume(run)
            if fit(run, state):  # False: preempted, with a checkpoint written; the job requeues and resumes
                finish(run, state)
        run.accelerator.end_training()
    finally:
        run.stop.restore()  # the process may go on (tests, notebooks): it must not keep ignoring SIGTERM
        run.lock.release()
    return run.out


def setup(cfg: Config) -> Run:
    """Check the inputs before any process group exists, then form it and build what training needs."""
    workers = resolve_workers(cfg.data.num_workers, gpu=torch.cuda.is_available())  # before any folder is made
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers.count))
    manifest = read_manifest(cfg.data.shards)  # first: a dataset that does not fit leaves no output folder behind
    for split in ("train", "val"):
        if manifest["splits"].get(split, {}).get("samples"):
            verify_split(cfg.data.shards, manifest, split)
    out = output_folder(cfg.train.output_dir, "train.output_dir")  # every rank: a bad folder fails all alike
    accelerator = make_accelerator(
        cfg.train.mixed_precision, cfg.train.dist_timeout_s, tracking.log_with(cfg), project_dir=str(out)
    )
    lock = lock_on_main(accelerator, out, "train.output_dir")
    if workers.note and accelerator.is_main_process:
        accelerator.print(workers.note)
    try:
        world, train_samples = accelerator.num_processes, manifest["splits"].get("train", {}).get("samples", 0)
        batches = batches_per_rank(train_samples, cfg.data.batch_size, world, cfg.train.grad_accum)
        if batches == 0:
            raise UserError(
                f"{cfg.data.shards} has {train_samples} train samples: too few for data.batch_size="
                f"{cfg.data.batch_size} x {world} processes x train.grad_accum={cfg.train.grad_accum}; lower "
                "data.batch_size"
            )
        if cfg.train.resume == "never" and complete_checkpoints(out):
            raise UserError(f"{out} already holds checkpoints; pass train.resume=auto or another train.output_dir")
        schedule = scaled_schedule(cfg.train, cfg.data.batch_size * world * cfg.train.grad_accum)
        set_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts them)
        dataset = of_manifest(manifest, f"{cfg.data.shards}/manifest.json")  # the classes: the head, the facts
        model = build_model(cfg.model.name, cfg.model.pretrained, len(dataset.codes), dataset.codes)
        if cfg.train.init_from != "none":
            shared = init_from(model, cfg.model.name, Path(cfg.train.init_from), dataset.codes)
            new = [c for c in dataset.codes if c not in shared]
            rows = f"backbone and head rows of {', '.join(shared) or 'no class'} from {cfg.train.init_from}"
            accelerator.print(f"train.init_from: {rows}; new head rows: {', '.join(new) or 'none'}")
        where = f"{cfg.data.shards}/manifest.json"
        facts = ModelFacts(cfg.model.name, dataset.codes, cfg.data.image_size, dataset.malignant)
        facts = facts.stored_as(manifest, where)  # how the shards' images were made: predict repeats it
        if facts.jpeg_quality is None:
            accelerator.print(
                f"note: {where} does not record its JPEG quality (prepared before it was): the checkpoints will not "
                "carry their shard size and quality, and predict and serve will resize files straight to the model's "
                "input, not as evaluate sees shards (docs/evaluation.md); rerun `skinlesion prepare` to record them"
            )
        if accelerator.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, schedule)
        model, optimizer = accelerator.prepare(model, optimizer)
        steps_per_epoch = batches // cfg.train.grad_accum
        augment = resolve_augment(cfg.data.augment, accelerator.device)
        run = Run(
            cfg=cfg,
            out=out,
            manifest=manifest,
            accelerator=accelerator,
            lock=lock,
            model=model,
            optimizer=optimizer,
            criterion=make_criterion(cfg.train, manifest).to(accelerator.device),
            stop=StopSignal(),
            check=StepCheck(accelerator.device),
            schedule=schedule,
            batches=batches,
            augment=augment,
            decode=resolve_decode(cfg.data.decode, augment, accelerator.device),
            mixer=make_mixer(cfg.train, len(dataset.codes)),
            ema=make_ema(accelerator.unwrap_model(model), schedule.ema_decay),
            total_steps=steps_per_epoch * cfg.train.epochs,
            warmup_steps=round(cfg.train.warmup_epochs * steps_per_epoch),
            facts=facts,
        )
    except BaseException:
        lock.release()
        raise
    run.stop.install()
    return run


def resume(run: Run) -> TrainerState:
    """The state to continue from: the newest checkpoint's (train.resume=auto), or a fresh one. Also records
    the resolved config and starts the W&B run (the same run id after a requeue)."""
    cfg, accelerator, out = run.cfg, run.accelerator, run.out
    recipe = cfg.to_dict()
    resumed = load_checkpoint(accelerator, cfg.train.resume, out, arch=cfg.model.name, ema=run.ema, recipe=recipe)
    if resumed is None and (out / "model.pt").exists():
        raise UserError(
            f"{out} holds model.pt of a finished run but no checkpoint to resume from; starting over would "
            f"overwrite it: choose another train.output_dir"
        )
    state = resumed[0] if resumed else TrainerState(arch=cfg.model.name)
    state.arch, state.recipe = cfg.model.name, recipe
    if accelerator.is_main_process:
        if resumed:
            accelerator.print(f"resuming from {resumed[1]} (epoch {state.epoch}, step {state.step})")
        if not run.has("val"):
            accelerator.print(
                f"notice: {cfg.data.shards} has no val samples: validation is skipped and best.pt "
                "is the last epoch's weights"
            )
        if cfg.train.freeze_backbone_epochs and cfg.model.pretrained == "none" and cfg.train.init_from == "none":
            accelerator.print(
                f"notice: train.freeze_backbone_epochs={cfg.train.freeze_backbone_epochs} with "
                "model.pretrained=none holds a random backbone still; set model.pretrained"
            )
        _keep_metrics_before(out / "metrics.jsonl", state.epoch)
        state.wandb_run_id = state.wandb_run_id or tracking.new_run_id()
        save_config(cfg, out / "config.yaml", runtime_info(accelerator))
    tracking.start_run(accelerator, cfg, state.wandb_run_id, cfg.to_dict() | {"runtime": runtime_info(accelerator)})
    tracking.log_dataset(accelerator, cfg.data.shards)  # W&B: manifest.json, the run's input artifact
    return state


def fit(run: Run, state: TrainerState) -> bool:
    """Train the remaining epochs, validating after each and keeping best.pt; False when preempted."""
    cfg, accelerator = run.cfg, run.accelerator
    if state.epoch >= cfg.train.epochs:
        return True
    # One loader, and one set of workers, for every remaining epoch: they prefetch the next epoch's first
    # batches while this one is validated and checkpointed.
    batches = iter(
        train_loader(
            cfg.data.shards,
            image_size=cfg.data.image_size,
            batch_size=cfg.data.batch_size,
            num_workers=cfg.data.num_workers,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            seed=cfg.train.seed,
            epoch=state.epoch,
            epochs=cfg.train.epochs - state.epoch,
            batches=run.batches,
            skip_batches=state.batches_in_epoch,
            shuffle_buffer=cfg.data.shuffle_buffer,
            augment=run.augment,
            decode=run.decode,
            manifest=run.manifest,
        )
    )
    val = None  # the val split's loader, its workers kept for the run like the train loader's
    if run.has("val"):
        rank, world = accelerator.process_index, accelerator.num_processes
        size, batch, workers = cfg.data.image_size, cfg.data.eval_batch_size, cfg.data.num_workers
        val = eval_loader(cfg.data.shards, "val", size, batch, workers, rank, world, run.manifest, persistent=True)
    told = False  # which metric keeps best.pt (and why, when the task's own is undefined): said once a run
    for epoch in range(state.epoch, cfg.train.epochs):
        state.epoch, started = epoch, time.perf_counter()
        epoch_stats = train_epoch(run, state, batches)
        if epoch_stats is None:  # preempted: checkpoint written, every rank leaves cleanly
            return False
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        record: dict[str, Any] = {"epoch": epoch, "step": state.step, **epoch_stats}
        accelerator.log({"train/skipped_samples": epoch_stats["skipped_samples"], "epoch": epoch}, step=state.step)
        score, result, name = None, None, "val_balanced_accuracy"
        if run.has("val"):
            last = epoch == cfg.train.epochs - 1  # plots: the last epoch's; metrics and predictions: every epoch's
            result = validate(accelerator, run.shipped, cfg, "val", run.out / "eval-val", run.manifest, val, plots=last)
            record |= result.record("val")
            chosen = selection(result.metrics)  # balanced accuracy; AUC for a binary task; else the loss
            name, score = chosen["metric"], chosen["value"]
            record |= {name: score, "best_pt_metric": name}  # val_auc is in no other column
            if not told and accelerator.is_main_process:
                accelerator.print(f"best.pt is kept by the {chosen['keeps']} {name} on the validation split")
                if chosen["note"]:
                    accelerator.print(f"warning: {chosen['note']}")
            told = True
            if run.ema is not None:  # the raw weights too, to compare
                raw = validate(accelerator, run.model, cfg, manifest=run.manifest, loader=val)
                record["val_balanced_accuracy_raw"] = raw.balanced_accuracy
            images = tracking_eval.png_images(accelerator, result.files, "val")
            accelerator.log(result.scalars("val") | images | {"epoch": epoch}, step=state.step)
        if accelerator.is_main_process:
            with (run.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        _update_best(accelerator, run.shipped, state, run.facts, run.out, epoch, score, name)
        val_line = (record["val_loss"], name, score) if result is not None else None
        seconds = time.perf_counter() - started
        line = epoch_line(epoch, cfg.train.epochs, epoch_stats, seconds, val_line, state.best_epoch == epoch)
        accelerator.print(line)  # main process only
        if result is not None and state.best_epoch == epoch:  # W&B: charts + most confident mistakes of best.pt
            tracking_eval.log_val_best(accelerator, result, cfg.data.shards, epoch, state.step, run.manifest)
        save_checkpoint(accelerator, run.out, state, cfg.train.keep_checkpoints, run.ema)
    return True


def finish(run: Run, state: TrainerState) -> None:
    """model.pt; best.pt on the test split exactly as `skinlesion evaluate` runs it; the model card."""
    cfg, accelerator, out = run.cfg, run.accelerator, run.out
    if accelerator.is_main_process:
        weights = bare_state_dict(accelerator, run.shipped)
        if not (out / "best.pt").is_file():  # resumed after the last epoch, and best.pt was deleted since
            accelerator.print(f"warning: {out}/best.pt was missing; exported the final weights as best.pt")
            export_best(
                weights,
                out / "best.pt",
                facts=run.facts,
                epoch=state.epoch - 1,
                step=state.step,
                metric={"name": "val_balanced_accuracy", "value": None},
            )
        export_model(weights, out / "model.pt", run.facts)
        (out / "preempted").unlink(missing_ok=True)
        best = "?" if state.best_epoch is None else state.best_epoch + 1  # counted from 1, as in `epoch_line`
        accelerator.print(f"done: {out}/model.pt, best.pt (epoch {best}/{cfg.train.epochs}), metrics.jsonl")
    accelerator.wait_for_everyone()  # best.pt is written by the main process
    test: EvalResult | None = None
    if run.has("test"):
        test, best = evaluate_checkpoint(
            accelerator,
            out / "best.pt",
            cfg.data.shards,
            "test",
            out / "eval",
            manifest=run.manifest,
            batch_size=cfg.data.eval_batch_size,
            num_workers=cfg.data.num_workers,
        )
        accelerator.log(test.scalars("test") | tracking_eval.png_images(accelerator, test.files, "test"))
        tracking_eval.log_test_charts(accelerator, test)  # W&B: interactive confusion matrix and ROC
        accelerator.print(test.summary())
    else:
        best = load_for_inference(out / "best.pt")
        best.model.to(accelerator.device)
    if run.has("val") and accelerator.is_main_process:  # model_card.json + ood.pt beside best.pt (skinlesion.card)
        calibrate(
            best.model,
            out / "best.pt",
            cfg.data.shards,
            best.image_size,
            best.arch,
            cfg.data.eval_batch_size,
            test_metrics=test.metrics if test else None,
            manifest=run.manifest,
            malignant=best.malignant,
        )
        accelerator.print(f"wrote {out}/model_card.json and ood.pt (risk bands and out-of-distribution threshold)")
    accelerator.wait_for_everyone()
    tracking.log_model(accelerator, out)  # W&B: best.pt, model card, ood.pt, config.yaml as the model artifact


def _update_best(
    accelerator: Accelerator,
    model: nn.Module,
    state: TrainerState,
    facts: ModelFacts,
    out: Path,
    epoch: int,
    score: float | None,
    name: str = "val_balanced_accuracy",
) -> None:
    """Export best.pt when validation improved strictly (a tie keeps the earlier epoch; "improved" is lower for
    `name` in LOWER_IS_BETTER, the loss that keeps a binary run without validation AUC), when there is no
    validation (the last epoch), or when best.pt is missing from this folder (a run branched from a copied
    checkpoint, or the file was deleted): then the best weights available are this epoch's, and it says so.
    """
    missing = not (out / "best.pt").is_file()
    better = (
        score is not None
        and state.best_metric is not None
        and (score < state.best_metric if name in LOWER_IS_BETTER else score > state.best_metric)
    )
    improved = score is None or state.best_metric is None or better
    if not (improved or missing):
        return
    if missing and not improved and accelerator.is_main_process:
        accelerator.print(
            f"warning: {out}/best.pt was missing (epoch {state.best_epoch}'s weights are not in this "
            f"folder); wrote epoch {epoch}'s as best.pt"
        )
    state.best_metric, state.best_epoch = score, epoch
    if accelerator.is_main_process:
        metric = {"name": name, "value": score}
        export_best(
            bare_state_dict(accelerator, model),
            out / "best.pt",
            facts=facts,
            epoch=epoch,
            step=state.step,
            metric=metric,
        )


def _keep_metrics_before(path: Path, epoch: int) -> None:
    """On resume, drop lines of epochs that will be trained again, so each epoch appears once; a last line cut
    short by a crash mid-append is dropped with a warning (`files.read_jsonl`)."""
    if not path.is_file():  # not only "absent": a test holds a run with a named pipe here (tests/helpers.py)
        return
    records = read_jsonl(path, "the run's metrics")
    kept = [r for r in records if isinstance(r.get("epoch"), int) and r["epoch"] < epoch]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
