#!/usr/bin/env bash
# The one-call GPU check: data -> bench step / loader / train -> a real 2-epoch training + evaluation.
#
#   benchmarks/gpu-check.sh OUTDIR          on a machine with one CUDA GPU (~16 cores); 301 s on one H200
#   benchmarks/gpu-check.sh --cpu OUTDIR    the same steps scaled down, on the CPU (what CI runs)
#   make gpu-check                          = benchmarks/gpu-check.sh runs/gpu-check
#
# Nothing is downloaded: it uses the python3 (and torch) the machine has, with this checkout on PYTHONPATH.
# Packages the machine lacks can travel as wheels in .whl/ (see docs/benchmarks.md); they are installed
# into /tmp/skinlesion-site first. It writes OUTDIR/summary.md and OUTDIR/summary.json, plus every
# command's own JSON and log.
set -euo pipefail

source "$(dirname "$0")/setup.sh" "$@"  # [--cpu] OUTDIR -> $cpu, $out, $repo, $PYTHON; sl, stage, logged

if [ "$cpu" -eq 1 ]; then
    images=300 stored=80 size=64 model=resnet18 batch=8 step_batch=8 workers=1 steps=6 precision=no epochs=2
    launch=(--num_processes 1 --cpu)
else
    images=4000 stored=256 size=224 model=resnet50 batch=128 step_batch=256 workers=14 steps=300 precision=bf16 epochs=2
    launch=(--num_processes 1 --mixed_precision bf16)
fi

stage "synth $images images, prepare at $stored px"
logged "$out/synth.log" sl synth "$out/data" --images "$images" --overwrite
logged "$out/prepare.log" sl prepare --metadata "$out/data/HAM10000_metadata.csv" \
    --images "$out/data/HAM10000_images_part_1" --images "$out/data/HAM10000_images_part_2" --out "$out/shards" \
    --image-size "$stored" --min-shards 16 --overwrite

stage "bench step: $model at $size px, batch $step_batch"
if [ "$cpu" -eq 1 ]; then
    sl bench step --model "$model" --image-size "$size" --batch-size "$step_batch" --precision no --steps 2 \
        --json "$out/step-fp32.json"
else
    sl bench step --model "$model" --image-size "$size" --batch-size "$step_batch" --precision bf16 \
        --json "$out/step-bf16.json"
    sl bench step --model "$model" --image-size "$size" --batch-size "$step_batch" --precision bf16 --channels-last \
        --json "$out/step-bf16-cl.json"
    sl bench step --model "$model" --image-size "$size" --batch-size "$step_batch" --precision bf16 --channels-last \
        --compile --json "$out/step-bf16-cl-compile.json" || echo "torch.compile failed; see above" >&2
fi

for augment in device cpu; do
    stage "bench loader: $augment augmentation, $workers workers"
    sl bench loader --shards "$out/shards" --image-size "$size" --workers "$workers" --batch-size 32 \
        --batches 20 --augment "$augment" --json "$out/loader-$augment.json"
done

common=(data.shards="$out/shards" data.image_size="$size" data.batch_size="$batch" data.num_workers="$workers"
    model.name="$model" train.mixed_precision="$precision" wandb.mode=disabled)
for augment in device cpu; do
    stage "bench train: $steps steps, $augment augmentation"
    sl bench train --config "$repo/configs/smoke.yaml" "${common[@]}" data.augment="$augment" --steps "$steps" \
        --json "$out/train-$augment.json"
done

stage "train $epochs epochs under accelerate launch, then evaluate"
rm -rf "$out/run"
logged "$out/train.log" "$PYTHON" -m accelerate.commands.launch "${launch[@]}" --num_machines 1 --dynamo_backend no \
    -m skinlesion train --config "$repo/configs/smoke.yaml" "${common[@]}" train.epochs="$epochs" \
    train.output_dir="$out/run"
logged "$out/evaluate.log" sl evaluate --checkpoint "$out/run/best.pt" --shards "$out/shards" --out "$out/run/eval-test"

"$PYTHON" - "$out" "$cpu" <<'EOF'
import json, sys, pathlib, platform
import torch
out, cpu = pathlib.Path(sys.argv[1]), sys.argv[2] == "1"
load = lambda name: json.loads((out / name).read_text()) if (out / name).is_file() else None
epochs = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
test = load("run/eval-test/metrics.json")
summary = {
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not cpu else f"cpu ({platform.processor() or platform.machine()})",
    "mode": "cpu" if cpu else "gpu",
    "versions": {"torch": torch.__version__},
    "step": {p.stem: load(p.name) for p in sorted(out.glob("step-*.json"))},
    "loader": {aug: load(f"loader-{aug}.json") for aug in ("device", "cpu")},
    "train": {aug: load(f"train-{aug}.json") for aug in ("device", "cpu")},
    "training": {"train_loss": [e["train_loss"] for e in epochs], "loss_fell": epochs[-1]["train_loss"] < epochs[0]["train_loss"],
                 "test_balanced_accuracy": test["balanced_accuracy"]},
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
rows = [f"# skinlesion GPU check: {summary['device']}", "", "| measurement | value |", "|---|---|"]
for name, r in summary["step"].items():
    rows.append(f"| bench {name} ({r['model']}, {r['image_size']} px, batch {r['batch_size']}) | {r['images_per_second']:.0f} images/s |")
for aug, r in summary["loader"].items():
    ms = r["ms_per_image"]
    rows.append(f"| loader, {aug} augmentation: ms per image (read/decode/crop/collate = total) | "
                f"{ms['read']:.3f}/{ms['decode']:.3f}/{ms['crop']:.3f}/{ms['collate']:.3f} = {ms['total']:.3f} |")
    rows.append(f"| loader, {aug}: images/s per worker; bytes per image | {r['images_per_second_per_worker']:.0f}; {r['bytes_per_image']} |")
for aug, r in summary["train"].items():
    rows.append(f"| bench train, {aug} augmentation: end to end / step only (input-bound fraction) | "
                f"{r['images_per_second']:.0f} / {r['step_images_per_second']:.0f} images/s ({r['input_bound_fraction']:.2f}) |")
t = summary["training"]
rows.append(f"| {len(t['train_loss'])}-epoch training: train loss per epoch | {', '.join(f'{v:.3f}' for v in t['train_loss'])} |")
rows.append(f"| test balanced accuracy after it | {t['test_balanced_accuracy']:.3f} |")
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
if not t["loss_fell"]:
    sys.exit("error: the training loss did not fall")
EOF
stage "done: $out/summary.md"
