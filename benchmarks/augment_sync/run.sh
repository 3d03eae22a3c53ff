#!/usr/bin/env bash
# The GPU comparison of docs/benchmarks.md ("Feeding the GPU"): run from the repository root on a CUDA machine
# with .whl/ holding the webdataset + braceexpand wheels; OUT names the folder for compare.json and the logs.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m skinlesion synth /tmp/d --images 4000 >/dev/null 2>&1
python3 -m skinlesion prepare --metadata /tmp/d/HAM10000_metadata.csv --images /tmp/d/HAM10000_images_part_1 \
    --images /tmp/d/HAM10000_images_part_2 --out /tmp/shards --image-size 256 --min-shards 16 >/dev/null 2>&1 || exit 1
timeout 300 python3 benchmarks/augment_sync/compare.py /tmp/shards "$OUT" 2>&1 | grep -v "it/s\]"
timeout 120 python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    -m skinlesion train --config configs/smoke.yaml data.shards=/tmp/shards data.image_size=224 data.batch_size=128 \
    data.num_workers=14 model.name=resnet50 train.mixed_precision=bf16 wandb.mode=disabled train.epochs=3 \
    train.output_dir=/tmp/run > "$OUT/train.log" 2>&1
cp /tmp/run/metrics.jsonl "$OUT/" 2>/dev/null
python3 -c "import json; [print('epoch', d['epoch'], round(d['images_per_second']), 'images/s') for d in map(json.loads, open('/tmp/run/metrics.jsonl'))]"
