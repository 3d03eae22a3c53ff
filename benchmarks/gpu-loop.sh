#!/usr/bin/env bash
# The real training loop on a GPU, against `bench train` in the same run: how much of the step the loop's own
# per-step work costs (divergence check, stop agreement, EMA, MixUp/CutMix), and that the fine-tuning recipe
# (frozen backbone, EMA, MixUp/CutMix) runs on CUDA.
#
#   benchmarks/gpu-loop.sh OUTDIR          on one CUDA GPU (~16 cores); 160 s on one H200
#   benchmarks/gpu-loop.sh --cpu OUTDIR    scaled down on the CPU, to check the script
#
# Like gpu-check.sh: no downloads; packages the machine lacks travel as wheels in .whl/.
set -euo pipefail
source "$(dirname "$0")/setup.sh" "$@"  # [--cpu] OUTDIR -> $cpu, $out, $repo, $PYTHON; sl, stage, logged

if [ "$cpu" -eq 1 ]; then
    images=200 stored=72 size=64 model=resnet18 batch=16 workers=1 steps=6 precision=no
    launch=(--num_processes 1 --cpu)
else
    images=12000 stored=256 size=224 model=resnet50 batch=128 workers=14 steps=200 precision=bf16
    launch=(--num_processes 1 --mixed_precision bf16)
fi

stage "synth $images images, prepare at $stored px (no balancing)"
logged "$out/synth.log" sl synth "$out/data" --images "$images" --overwrite
logged "$out/prepare.log" sl prepare --metadata "$out/data/HAM10000_metadata.csv" \
    --images "$out/data/HAM10000_images_part_1" --images "$out/data/HAM10000_images_part_2" --out "$out/shards" \
    --image-size "$stored" --min-shards 16 --overwrite
common=(data.shards="$out/shards" data.image_size="$size" data.batch_size="$batch" data.num_workers="$workers"
    model.name="$model" train.mixed_precision="$precision" wandb.mode=disabled train.epochs=2 train.log_every_steps=1000)
recipe=(train.mix_prob=0.5 train.mixup_alpha=0.2 train.cutmix_alpha=1.0 train.ema_decay=0.99
    train.freeze_backbone_epochs=1 train.backbone_lr_mult=0.1)

stage "bench train: $steps steps (loader + device augmentation + step, no loop bookkeeping)"
sl bench train --config "$repo/configs/smoke.yaml" "${common[@]}" --steps "$steps" --json "$out/bench-train.json"
for name in plain recipe; do
    extra=()
    [ "$name" = recipe ] && extra=("${recipe[@]}")
    stage "train.py, 2 epochs: $name ${extra[*]}"
    logged "$out/train-$name.log" "$PYTHON" -m accelerate.commands.launch "${launch[@]}" --num_machines 1 \
        --dynamo_backend no -m skinlesion train --config "$repo/configs/smoke.yaml" "${common[@]}" "${extra[@]}" \
        train.output_dir="$out/run-$name"
    cp "$out/run-$name/metrics.jsonl" "$out/metrics-$name.jsonl"
done
"$PYTHON" - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
bench = json.loads((out / "bench-train.json").read_text())
print(f"bench train: {bench['images_per_second']:.0f} images/s end to end, {bench['step_images_per_second']:.0f} step only")
for name in ("plain", "recipe"):
    rows = [json.loads(line) for line in (out / f"metrics-{name}.jsonl").read_text().splitlines()]
    rates = ", ".join(f"{r['images_per_second']:.0f}" for r in rows)
    losses = ", ".join(f"{r['train_loss']:.3f}" for r in rows)
    print(f"train.py {name}: images/s per epoch {rates}; train loss {losses}; "
          f"val balanced accuracy {rows[-1]['val_balanced_accuracy']:.3f}")
PY
stage "done"
