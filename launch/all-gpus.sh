#!/usr/bin/env bash
# `accelerate launch` with one training process per GPU that this process sees (CUDA_VISIBLE_DEVICES honoured):
#
#   launch/all-gpus.sh [accelerate launch options] -m skinlesion train --config configs/ham10000.yaml [key=value ...]
#
# Accelerate takes num_processes from its config file and cannot count GPUs there, so this script counts them
# (torch.cuda.device_count(), the count the workers will see) and passes --num_processes: 2 or more GPUs run
# launch/multi-gpu.yaml, one GPU launch/one-gpu.yaml (Accelerate refuses MULTI_GPU with one process). Options
# before -m go to `accelerate launch` (e.g. --mixed_precision fp16 on pre-Ampere cards). GPUS=N overrides
# the count (e.g. to use the first N GPUs without setting CUDA_VISIBLE_DEVICES).
set -euo pipefail
here=$(dirname "$(realpath "$0")")
gpus=${GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())' || echo none)}
if ! [[ $gpus =~ ^[0-9]+$ ]] || [ "$gpus" -lt 1 ]; then
    echo "error: launch/all-gpus.sh found no CUDA GPU (GPUS or torch.cuda.device_count() gave '$gpus'," \
        "CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-unset}'); on a CPU machine use" \
        "accelerate launch --config_file launch/cpu-2proc.yaml" >&2
    exit 2
fi
config=$here/multi-gpu.yaml
[ "$gpus" -eq 1 ] && config=$here/one-gpu.yaml
echo "launch/all-gpus.sh: $gpus GPU(s): accelerate launch --config_file $config --num_processes $gpus" >&2
exec accelerate launch --config_file "$config" --num_processes "$gpus" "$@"
