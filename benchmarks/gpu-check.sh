#!/usr/bin/env bash
# The one-call GPU check: data -> bench step / loader / train -> the shipped recipe as users launch it, beside
# `bench step` at the recipe's batch, precision and memory format, in the same run.
#
#   benchmarks/gpu-check.sh OUTDIR          on a machine with one CUDA GPU (~16 cores); at most 8 minutes
#   benchmarks/gpu-check.sh --cpu OUTDIR    the same steps scaled down, on the CPU (what CI runs)
#   make gpu-check                          = benchmarks/gpu-check.sh runs/gpu-check
#
# Nothing is downloaded: it uses the python3 (and torch) the machine has, with this checkout on PYTHONPATH.
# Packages the machine lacks can travel as wheels in .whl/ (see docs/benchmarks.md); they are installed
# into /tmp/skinlesion-site first. It writes OUTDIR/summary.md and OUTDIR/summary.json, plus every
# command's own JSON and log.
#
# Data: with the HAM10000 sample at ../shared/data/ham10000-sample (or ./shared/..., where the GPU tool copies
# shared/), real content at HAM10000's scale: the real metadata's 10,015 image ids, each one of the sample's
# 150 images in turn, prepared at 256 px with --samples-per-class 3000 (21,000 train images an epoch).
# Without it, synthetic images. The CPU mode takes 300 of the ids (or 300 synthetic images) at 80 px.
#
# Time budget on one H100/H200 (estimates from the 301 s run of the previous version of this script on an
# H200, docs/benchmarks.md; not yet measured as a whole): data 60 s, bench step x3 45 s, bench loader x3
# 45 s, bench train x3 100 s, the recipe (2 epochs of 21,000 images at batch 256 + validation + test) 70 s and
# its bench step 15 s: about 335 s. The recipe again with train.compile=true (compile ~60-90 s, 2 epochs,
# its bench step --compile ~60 s) takes ~170 s more and runs only when it can finish within 480 s: the
# script skips it after COMPILE_DEADLINE seconds (default 300) and says so in summary.json.
set -euo pipefail

source "$(dirname "$0")/setup.sh" "$@"  # [--cpu] OUTDIR -> $cpu, $out, $repo, $PYTHON; sl, stage, logged, stamped
started=$SECONDS

if [ "$cpu" -eq 1 ]; then
    images=300 stored=80 size=64 model=resnet18 batch=8 step_batch=8 workers=1 steps=6 precision=no per_class=16
    launch=(--cpu --mixed_precision no)
    # The recipe scaled down to what a CI CPU runs in about a minute; everything else is configs/ham10000.yaml.
    scale=(model.name=resnet18 data.image_size=64 data.batch_size=8 data.eval_batch_size=32 data.num_workers=1
        data.shuffle_buffer=100)
else
    images=4000 stored=256 size=224 model=resnet50 batch=128 step_batch=256 workers=14 steps=300 precision=bf16
    per_class=3000 launch=() scale=()
fi

sample=""
for candidate in "$repo/../shared/data/ham10000-sample" "$repo/shared/data/ham10000-sample"; do
    if [ -f "$candidate/HAM10000_metadata.csv" ] && [ -d "$candidate/images" ]; then
        sample=$(cd "$candidate" && pwd)
        break
    fi
done
if [ -n "$sample" ]; then
    limit=()
    [ "$cpu" -eq 1 ] && limit=("$images")
    stage "real-content data: the sample's metadata ids, its 150 images cycled; prepare at $stored px"
    rm -rf "$out/data"
    count=$("$PYTHON" -m skinlesion.recipe_check images "$sample" "$out/data/images" "${limit[@]}")
    data=(--metadata "$sample/HAM10000_metadata.csv" --images "$out/data/images")
    source_kind="real content: $count image ids of $sample/HAM10000_metadata.csv, its images cycled"
else
    stage "synth $images images, prepare at $stored px"
    logged "$out/synth.log" sl synth "$out/data" --images "$images" --overwrite
    data=(--metadata "$out/data/HAM10000_metadata.csv" --images "$out/data/HAM10000_images_part_1"
        --images "$out/data/HAM10000_images_part_2")
    source_kind="synthetic: $images images"
fi
logged "$out/prepare.log" sl prepare "${data[@]}" --out "$out/shards" --image-size "$stored" \
    --samples-per-class "$per_class" --min-shards 16 --overwrite

stage "bench step: $model at $size px, batch $step_batch"
if [ "$cpu" -eq 1 ]; then
    sl bench step --model "$model" --image-size "$size" --batch-size "$step_batch" --precision no --steps 2 \
        --json "$out/step-fp32.json"
else
    sl bench step --model "$model" --image-size "$size" --batch-size "$step_batch" --precision bf16 \
        --json "$out/step-bf16.json"
    sl bench step --model "$model" --image-size "$size" --batch-size "$step_batch" --precision bf16 --channels-last \
        --json "$out/step-bf16-cl.json"
fi

for path in device-cpu cpu-cpu device-device; do  # augment-decode
    augment=${path%-*} decode=${path#*-}
    stage "bench loader: $augment augmentation, $decode decode, $workers workers"
    sl bench loader --shards "$out/shards" --image-size "$size" --workers "$workers" --batch-size 32 \
        --batches 20 --augment "$augment" --decode "$decode" --json "$out/loader-$path.json"
done

common=(data.shards="$out/shards" data.image_size="$size" data.batch_size="$batch" data.num_workers="$workers"
    model.name="$model" train.mixed_precision="$precision" wandb.mode=disabled)
for path in device-cpu cpu-cpu device-device; do  # augment-decode
    augment=${path%-*} decode=${path#*-}
    stage "bench train: $steps steps, $augment augmentation, $decode decode"
    sl bench train --config "$repo/configs/smoke.yaml" "${common[@]}" data.augment="$augment" data.decode="$decode" \
        --steps "$steps" --json "$out/train-$path.json"
done

if [ "$cpu" -eq 0 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi dmon -s u -o DT -f "$out/dmon.txt" &  # SM % each second, with the wall clock
    dmon_pid=$!
    trap 'kill "$dmon_pid" 2>/dev/null || true' EXIT
fi

# The recipe exactly as the README launches it, shortened: 2 epochs (the first trains the head on the frozen
# backbone), no ImageNet weights (none reach the GPU machine). Its bench step: the same model, batch, image size
# and precision (read from the recipe and the launch file), channels_last as train.py uses on CUDA.
recipe=(data.shards="$out/shards" train.epochs=2 model.pretrained=none wandb.mode=disabled "${scale[@]}")
read -r r_model r_size r_batch r_precision < <("$PYTHON" - "$repo" "$cpu" "${recipe[@]}" <<'EOF'
import sys, pathlib, yaml
from skinlesion.config import load_config
repo, cpu, overrides = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
cfg = load_config(repo / "configs/ham10000.yaml", overrides)
launch = yaml.safe_load((repo / "launch/one-gpu.yaml").read_text())
print(cfg.model.name, cfg.data.image_size, cfg.data.batch_size, "no" if cpu else launch["mixed_precision"])
EOF
)
layout=()
[ "$cpu" -eq 0 ] && layout=(--channels-last)
run_recipe() {  # NAME [override...]: the recipe, its bench step, its summary block in $out/NAME.json
    local name=$1 step_flags=()
    shift
    [[ " $* " == *" train.compile=true "* ]] && step_flags=(--compile)
    stage "$name: accelerate launch --config_file launch/one-gpu.yaml -m skinlesion train --config configs/ham10000.yaml $*"
    rm -rf "${out:?}/$name"
    logged "$out/$name.log" stamped "$PYTHON" -m accelerate.commands.launch --config_file "$repo/launch/one-gpu.yaml" \
        "${launch[@]}" -m skinlesion train --config "$repo/configs/ham10000.yaml" "${recipe[@]}" "$@" \
        train.output_dir="$out/$name"
    stage "$name: bench step at its settings ($r_model, $r_size px, batch $r_batch, $r_precision ${layout[*]} ${step_flags[*]})"
    sl bench step --model "$r_model" --image-size "$r_size" --batch-size "$r_batch" --precision "$r_precision" \
        "${layout[@]}" "${step_flags[@]}" --json "$out/step-$name.json"
    "$PYTHON" -m skinlesion.recipe_check summary "$out/$name" "$out/$name.log" "$out/dmon.txt" \
        "$out/step-$name.json" >"$out/$name.json"
}
run_recipe recipe
deadline=${COMPILE_DEADLINE:-300}
if [ "$cpu" -eq 0 ] && [ $((SECONDS - started)) -lt "$deadline" ]; then
    run_recipe recipe-compile train.compile=true
else
    compile_skipped="after $((SECONDS - started)) s (deadline $deadline s)"
    [ "$cpu" -eq 1 ] && compile_skipped="CPU mode: inductor's compile alone outlasts the scaled-down run"
    stage "recipe with train.compile=true skipped: $compile_skipped"
fi

"$PYTHON" - "$out" "$cpu" "$source_kind" "${compile_skipped:-}" "$((SECONDS - started))" <<'EOF'
import json, sys, pathlib, platform
import torch
out, cpu, source, skipped, seconds = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4], int(sys.argv[5])
load = lambda name: json.loads((out / name).read_text()) if (out / name).is_file() else None
recipe, test = load("recipe.json"), load("recipe/eval/metrics.json")
summary = {
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not cpu else f"cpu ({platform.processor() or platform.machine()})",
    "mode": "cpu" if cpu else "gpu",
    "data": source,
    "seconds_before_summary": seconds,
    "versions": {"torch": torch.__version__},
    "step": {p.stem: load(p.name) for p in sorted(out.glob("step-*.json")) if not p.stem.startswith("step-recipe")},
    "loader": {path.replace("-cpu", "", 1) if path != "device-device" else "device_decode": load(f"loader-{path}.json")
               for path in ("device-cpu", "cpu-cpu", "device-device")},
    "train": {name: load(f"train-{path}.json") for name, path in (("device", "device-cpu"), ("cpu", "cpu-cpu"),
                                                                   ("device_decode", "device-device"))},
    "recipe": {k: v for k, v in recipe.items() if k != "train_loss"},
    "recipe_compile": load("recipe-compile.json") or {"skipped": skipped},
    "training": {"train_loss": recipe["train_loss"], "loss_fell": recipe["train_loss"][-1] < recipe["train_loss"][0],
                 "test_balanced_accuracy": test["balanced_accuracy"] if test else None},
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
rows = [f"# skinlesion GPU check: {summary['device']}", "", f"data: {source}", "", "| measurement | value |", "|---|---|"]
for name, r in summary["step"].items():
    rows.append(f"| bench {name} ({r['model']}, {r['image_size']} px, batch {r['batch_size']}) | {r['images_per_second']:.0f} images/s |")
for path, r in summary["loader"].items():
    ms, what = r["ms_per_image"], f"{r['augment']} augmentation, {r['decode']} decode"
    rows.append(f"| loader, {what}: ms per image on one core (read/decode/crop/collate = total) | "
                f"{ms['read']:.3f}/{ms['decode']:.3f}/{ms['crop']:.3f}/{ms['collate']:.3f} = {ms['total']:.3f} |")
    rows.append(f"| loader, {what}: images/s per worker; bytes per image | {r['images_per_second_per_worker']:.0f}; {r['bytes_per_image']:.0f} |")
    if r["device_decode_ms_per_batch"] is not None:
        rows.append(f"| device decode of a batch of {r['batch_size']} on {r['device']}: ms; max / mean abs difference "
                    f"from the CPU decode | {r['device_decode_ms_per_batch']:.2f}; {r['device_decode_max_abs_diff']:.0f} / "
                    f"{r['device_decode_mean_abs_diff']:.3f} |")
for aug, r in summary["train"].items():
    rows.append(f"| bench train, {aug.replace('_', ' ')} path: end to end / step only (input-bound fraction) | "
                f"{r['images_per_second']:.0f} / {r['step_images_per_second']:.0f} images/s ({r['input_bound_fraction']:.2f}) |")
for name in ("recipe", "recipe_compile"):
    r = summary[name]
    if "images_per_second" not in r:
        rows.append(f"| {name}: skipped | {r['skipped']} |")
        continue
    sm = "n/a" if r["sm_busy"] is None else f"{r['sm_busy']:.0f}%"
    extra = "" if r["compile_seconds"] is None else f"; compile {r['compile_seconds']:.0f} s"
    rows.append(f"| {name} (configs/ham10000.yaml under accelerate launch), last epoch / bench step at its settings | "
                f"{r['images_per_second']:.0f} / {r['step_images_per_second']:.0f} images/s ({r['ratio_to_step']:.2f}); SM busy {sm}{extra} |")
t = summary["training"]
rows.append(f"| recipe, {len(t['train_loss'])} epochs: train loss per epoch | {', '.join(f'{v:.3f}' for v in t['train_loss'])} |")
if t["test_balanced_accuracy"] is not None:
    rows.append(f"| test balanced accuracy after it (random init, 2 epochs: shows the loop runs) | {t['test_balanced_accuracy']:.3f} |")
rows.append(f"| seconds for the whole check before this summary | {seconds} |")
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
stage "done: $out/summary.md"
