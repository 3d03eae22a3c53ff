"""One epoch of optimizer steps (`train_epoch`) and validation (`validate`): what `train.fit` repeats.

The step fits on one screen and reads nothing back from the device: `StepCheck` reads the loss's health and
the stop flag every ``train.log_every_steps`` steps, at the epoch's last step and before a mid-epoch
checkpoint, so the CPU queues step k+1 while the GPU still runs step k (docs/training.md says why this and
not a fused optimizer's ``found_inf``). tests/test_host_sync.py counts the read-backs.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from skinlesion import compiling
from skinlesion.checkpoint import TrainerState, complete_checkpoints, save_checkpoint
from skinlesion.config import Config
from skinlesion.data.batches import decoded, model_input
from skinlesion.distributed import signal_name
from skinlesion.errors import UserError
from skinlesion.evaluate import EvalResult, evaluate
from skinlesion.files import atomic_write
from skinlesion.optim import freeze_batchnorm, lr_at, set_lr

if TYPE_CHECKING:
    from skinlesion.train import Run


def train_epoch(run: Run, state: TrainerState, batches: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
    """Train the rest of `state.epoch`; per-epoch stats, or None when the ranks agreed to stop (preempted).

    Nothing in the step reads a device value: `run.check` reads the loss's health and the stop flag every
    train.log_every_steps steps, at the epoch's last step and before a mid-epoch checkpoint."""
    cfg, accelerator, accum = run.cfg, run.accelerator, run.cfg.train.grad_accum
    rank, frozen = accelerator.process_index, state.epoch < cfg.train.freeze_backbone_epochs
    model = run.model if frozen else compiled(run)  # frozen epochs run eager: BatchNorm's mode is in the graph
    steps, total = (run.batches - state.batches_in_epoch) // accum, run.batches // accum
    bar = tqdm(
        total=total,
        initial=total - steps,
        desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",  # counted from 1, as in `epoch_line`
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    loss_sum = torch.zeros((), device=accelerator.device)  # sum of sample losses on this rank, kept on the device
    images, skipped, started, wall = 0, 0, time.perf_counter(), time.time()  # host numbers: no host-to-device copy
    run.model.train()
    if frozen:  # the head learns on the pretrained features: BatchNorm keeps their statistics
        freeze_batchnorm(run.model)
    for done in range(1, steps + 1):
        lr = lr_at(state.step, run.total_steps, run.warmup_steps, run.schedule)
        set_lr(run.optimizer, lr, run.schedule, frozen)
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(accum):
            batch, index = decoded(next(batches), accelerator.device), state.batches_in_epoch + micro
            x, y = model_input(batch, accelerator.device, cfg.train.seed, state.epoch, rank, index)
            if run.mixer is not None:
                x, y = run.mixer(x, y, state.epoch, rank, index)
            skipped += batch.get("skipped", 0)
            timed = model is not run.model and run.compile_seconds is None and time.perf_counter()
            with contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(run.model):
                loss = run.criterion(model(x), y)
                accelerator.backward(loss / accum)
            if timed:  # the first compiled forward and backward: Dynamo and the backend compile, on the host
                run.compile_seconds = time.perf_counter() - timed
            step_loss += loss.detach() / accum
            loss_sum += loss.detach() * len(y)
            images += len(y)
        run.check.observe(step_loss, state.step)
        if cfg.train.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if run.ema is not None and state.step % cfg.train.ema_every_steps == 0:
            run.ema.update_parameters(accelerator.unwrap_model(model))
        state.batches_in_epoch += accum
        bar.update()

        every = cfg.train.checkpoint_every_steps
        save = bool(every) and state.step % every == 0 and done < steps
        if not (save or done == steps or state.step % cfg.train.log_every_steps == 0):
            continue
        stop_signal, loss_value = _agree(run, state)  # the one read-back: raises on a non-finite loss
        throughput = images * accelerator.num_processes / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{throughput:.0f}")
        logged = {"train/loss": loss_value, "train/lr": lr, "train/images_per_second": throughput}
        accelerator.log(logged, step=state.step)
        if stop_signal or save:
            save_checkpoint(accelerator, cfg.train.output_dir, state, cfg.train.keep_checkpoints, run.ema)
        if stop_signal:
            bar.close()
            _write_preempted(accelerator, Path(cfg.train.output_dir), state, stop_signal)
            return None
    bar.close()
    counts = torch.tensor([images, skipped], dtype=loss_sum.dtype, device=loss_sum.device)
    total_sum = accelerator.reduce(torch.cat([loss_sum[None], counts]), reduction="sum").tolist()
    stats: dict[str, Any] = {
        "train_loss": total_sum[0] / max(total_sum[1], 1),
        "lr": lr_at(max(state.step - 1, 0), run.total_steps, run.warmup_steps, run.schedule),  # the head's
        "images_per_second": images * accelerator.num_processes / (time.perf_counter() - started),
        "steps_window": [wall, time.time()],  # Unix times of the epoch's steps (gpu-check matches nvidia-smi's)
        "skipped_samples": int(total_sum[2]),
    }
    if model is not run.model:  # compiled: what it cost, and whether anything compiled again
        stats |= {"compile_seconds": run.compile_seconds, "compiled_graphs": compiling.graphs()}
    return stats


def epoch_line(
    epoch: int,
    epochs: int,
    stats: dict[str, Any],
    seconds: float,
    val: tuple[float, str, float | None] | None,
    best: bool,
) -> str:
    """The one line the main process prints per epoch, e.g. ``epoch 3/4  loss 0.41  val loss 0.38  val
    balanced_accuracy 0.91  1,230 images/s  12.4 s  -> best.pt``: the progress bar shows the step, this says
    whether the epoch helped. `stats` are `train_epoch`'s; `val` is (val loss, the name of the metric that
    chooses best.pt as metrics.jsonl spells it, ``val_<name>``, its value), None without a val split. Epochs
    count from 1 here, as in the progress bar (metrics.jsonl and best.pt count from 0)."""

    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    parts = [f"epoch {epoch + 1}/{epochs}", f"loss {num(stats['train_loss'])}"]
    if val is not None:
        loss, name, score = val
        parts += [f"val loss {num(loss)}", f"val {name.removeprefix('val_')} {num(score)}"]
    parts += [f"{stats['images_per_second']:,.0f} images/s", f"{seconds:.1f} s"]
    return "  ".join(parts) + ("  -> best.pt" if best else "")


def _agree(run: Run, state: TrainerState) -> tuple[int, float]:
    """All ranks' verdict: (stop signal or 0, mean loss of the last step). A non-finite loss since the last
    check is an error naming its step; no checkpoint or export has been written since that step."""
    stop_signal, bad_step, loss_value, bad_loss = run.check.agree(run.accelerator, run.stop.received)
    if bad_step is not None:
        last = complete_checkpoints(run.cfg.train.output_dir)
        lr = lr_at(bad_step, run.total_steps, run.warmup_steps, run.schedule)
        value = "non-finite on another rank" if bad_loss is None else str(bad_loss)
        raise UserError(
            f"the loss became {value} at epoch {state.epoch}, step {bad_step} (lr {lr:.3g}); stopped before "
            f"saving anything trained since. Last good checkpoint: {last[0] if last else 'none'}. "
            f"Lower train.lr, keep train.grad_clip > 0, or try train.mixed_precision=no"
        )
    return stop_signal, loss_value


def compiled(run: Run) -> nn.Module:
    """The model under torch.compile (train.compile), made once, at the first epoch that trains the backbone:
    a frozen epoch's BatchNorm layers are in eval mode, a different graph, so compiling it too would cost a
    second full compile for an epoch whose backward is cheap. Validation uses the eager module (no compile)."""
    if not run.cfg.train.compile:
        return run.model
    if run.compiled is None:
        run.compiled = compiling.compile_model(run.model, run.cfg.train.compile_backend, run.out)
    return run.compiled


@torch.no_grad()
def validate(
    accelerator: Accelerator,
    model: nn.Module,
    cfg: Config,
    split: str = "val",
    out: Path | None = None,
    manifest: dict[str, Any] | None = None,
    loader: Iterable[dict[str, Any]] | None = None,
    plots: bool = True,
) -> EvalResult:
    """The evaluator of `skinlesion evaluate` on `split`: every sample once across ranks, same metrics on all.
    `loader`: the split's eval loader with workers kept for the run (`train.fit`), else a new one. `plots`:
    the PNGs too (most of a validation pass's file writing, on the main process while the other ranks wait).

    BatchNorm statistics are first made identical on every rank (DDP only broadcasts them at the next
    forward), so the result does not depend on the number of processes.
    """
    net = accelerator.unwrap_model(model)
    _sync_buffers(accelerator, net)
    return evaluate(
        net,
        accelerator,
        cfg.data.shards,
        split,
        cfg.data.image_size,
        out=out,
        batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        n_bootstrap=0,
        manifest=manifest,
        loader=loader,
        plots=plots,
    )


def _sync_buffers(accelerator: Accelerator, net: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics (DDP broadcasts them only at the next forward)."""
    if accelerator.num_processes > 1:
        for buffer in net.buffers():
            torch.distributed.broadcast(buffer, src=0)


def _write_preempted(accelerator: Accelerator, out: Path, state: TrainerState, signum: int) -> None:
    """The file the sbatch script looks for to requeue the job."""
    if accelerator.is_main_process:
        atomic_write(
            out / "preempted", json.dumps({"step": state.step, "epoch": state.epoch, "signal": signal_name(signum)})
        )
        accelerator.print(f"stopped by {signal_name(signum)} at step {state.step}; checkpoint saved, resume to go on")
