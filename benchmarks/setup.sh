# shellcheck shell=bash
# What benchmarks/gpu-check.sh and benchmarks/gpu-loop.sh share, sourced with their arguments:
#
#   source "$(dirname "$0")/setup.sh" "$@"
#
# It reads [--cpu] OUTDIR into $cpu (0/1) and $out, sets $repo and $PYTHON (default python3), installs the
# wheels in .whl/ (packages a GPU machine lacks; nothing is downloaded) into /tmp/skinlesion-site, puts that
# and the checkout on PYTHONPATH, checks the packages and the GPU, and defines `sl` (skinlesion),
# `stage` (a timestamped line), `logged LOG COMMAND...` (output to LOG; on failure its end, and stop) and
# `stamped COMMAND...` (stdout and stderr, each line and tqdm redraw prefixed with the Unix time).
cpu=0
if [ "${1:-}" = "--cpu" ]; then
    cpu=1
    shift
fi
if [ $# -ne 1 ]; then
    echo "usage: $0 [--cpu] OUTDIR" >&2
    exit 2
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
PYTHON=${PYTHON:-python3}

if compgen -G "$repo/.whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/skinlesion-site \
        "$repo"/.whl/*.whl
    export PYTHONPATH=/tmp/skinlesion-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
export WANDB_MODE=disabled PYTHONUNBUFFERED=1

missing=$("$PYTHON" - <<'PY'
import importlib.util
needed = ["torch", "torchvision", "accelerate", "webdataset", "pandas", "PIL", "sklearn", "yaml", "tqdm", "matplotlib"]
print(" ".join(n for n in needed if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
    echo "error: $PYTHON lacks: $missing. Install them, or carry them as wheels in $repo/.whl/ (docs/benchmarks.md)" >&2
    exit 2
fi
if [ "$cpu" -eq 0 ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "error: no CUDA GPU visible to $PYTHON; run with --cpu for the scaled-down CPU check" >&2
    exit 2
fi

sl() { "$PYTHON" -m skinlesion "$@"; }
stage() { echo "[$(date +%T)] $*"; }
logged() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 || { tail -20 "$log" >&2; exit 1; }
}
stamped() {
    "$@" 2>&1 | "$PYTHON" -m skinlesion.recipe_check stamp
}
