# shellcheck shell=bash
# The training job that slurm/train.sbatch and slurm/sweep.sbatch share: signal forwarding, the multi-node
# `accelerate launch`, and preemption -> requeue. Sourced (not run) by those scripts after they have set
# REPO (the checkout) and cd'ed to the submit folder; a signal caught before that is in $pending_signal.
#
#   source "$REPO/slurm/job.sh"
#   train_job CONFIG [key=value ...]    # exits the script with the training step's status
#
# Preemption: SLURM sends USR1 to the batch shell (--signal=B:USR1@180; `scancel --signal=USR1 --batch JOB`
# by hand), which forwards it to the step; the trainer checkpoints at the next optimizer step, writes
# <output_dir>/preempted and exits 0; train_job then requeues the job (an array task alone), which resumes
# by itself (train.resume=auto). The requeue decision rides on that file, not on an exit code, because
# `accelerate launch` turns every worker failure into status 1. A step that fails otherwise leaves
# <output_dir>/failed (its status and job) for `skinlesion sweep summarize`; each attempt removes both files.

# Record a signal that arrives before the step exists; forward it once it does.
step_pid=""
pending_signal=${pending_signal:-}
got_term=""
[ "$pending_signal" = TERM ] && got_term=1
forward() {
    echo "[$(date +%T)] batch shell got SIG$1; forwarding it to the training step" >&2
    [ "$1" = TERM ] && got_term=1
    if [ -n "$step_pid" ]; then
        kill -s "$1" "$step_pid" 2>/dev/null || true
    else
        pending_signal=$1
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
[ -n "$pending_signal" ] && echo "[$(date +%T)] batch shell got SIG$pending_signal before the step started" >&2

if ! python -c 'import skinlesion' 2>/dev/null && [ -f "$REPO/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$REPO/.venv/bin/activate"
fi
export WANDB_MODE=${WANDB_MODE:-offline}
export PYTHONUNBUFFERED=1
# An array task is named JOB_TASK by squeue, scontrol and scancel; $SLURM_JOB_ID is the task's own id.
JOB_NAME=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
JOB_NAME=${JOB_NAME:-$SLURM_JOB_ID}

# Runs once on every node (under srun), so $SLURM_NODEID and the GPU count are this node's own.
# shellcheck disable=SC2317  # called through srun, not directly
node_main() {
    local nproc=${SLURM_GPUS_ON_NODE:-0} precision=${MIXED_PRECISION:-bf16} device=GPU
    if [ "$nproc" -eq 0 ]; then
        nproc=${NPROC_PER_NODE:-1} precision=${MIXED_PRECISION:-no} device=CPU
        export ACCELERATE_USE_CPU=1 # without it, CPU "DDP" silently trains every rank alone
    fi
    local total=$((nproc * SLURM_JOB_NUM_NODES))
    echo "[$(date +%T)] node $SLURM_NODEID (${SLURMD_NODENAME:-$(hostname -s)}): $nproc process(es) of $total on $device"
    # srun delivers USR1 to every process of the step. The launcher must survive it (the default action
    # kills it), so it ignores USR1; the python workers inherit "ignore" and install their own handler.
    trap '' USR1
    # launch/multi-node.yaml keeps a user's ~/.cache/huggingface/accelerate default config out of the job; the
    # flags fill in this job's geometry. The precision is what train.mixed_precision=auto resolves to.
    exec accelerate launch --config_file "$REPO/launch/multi-node.yaml" --num_processes "$total" \
        --num_machines "$SLURM_JOB_NUM_NODES" --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_ADDR" \
        --main_process_port "$MAIN_PORT" --mixed_precision "$precision" -m skinlesion train --config "$@"
}

train_job() {
    # Ask the config loader itself where outputs go, so overrides and recipe defaults are honoured; this also
    # rejects a bad config here, before any node starts.
    local output_dir
    output_dir=$(python - "$@" <<'PY'
import sys

from skinlesion.config import load_config
from skinlesion.errors import UserError

try:
    print(load_config(sys.argv[1], sys.argv[2:]).train.output_dir)
except UserError as exc:
    sys.exit(f"error: {exc}")
PY
)

    local first_node
    first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
    MAIN_ADDR=$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
    MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MAIN_ADDR MAIN_PORT REPO

    echo "[$(date +%T)] job $JOB_NAME (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_JOB_NUM_NODES node(s)" \
        "[$SLURM_JOB_NODELIST], rendezvous $MAIN_ADDR:$MAIN_PORT, output $output_dir"
    echo "command: skinlesion train --config $*"

    # A file left by an earlier attempt must not trigger another requeue (or a "failed" mark) if this attempt
    # ends differently.
    rm -f "$output_dir/preempted" "$output_dir/failed"

    # Single quotes keep $SLURM_NODEID unexpanded here: each node evaluates its own (an expanded one would
    # make every node machine rank 0 and the rendezvous would time out). --cpus-per-task is passed on because
    # srun stopped reading SLURM_CPUS_PER_TASK in SLURM 22.05: without it the step's task may be bound to one
    # core, and every loader worker on the node would share it.
    srun --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} --kill-on-bad-exit=1 \
        bash -c "$(declare -f node_main)"'; node_main "$@"' node_main "$@" &
    step_pid=$!
    [ -n "$pending_signal" ] && forward "$pending_signal"

    # `wait` returns early whenever a trapped signal arrives, so wait until the step is gone, then collect its
    # status (bash remembers it).
    while kill -0 "$step_pid" 2>/dev/null; do
        wait "$step_pid" || true
    done
    local status=0
    wait "$step_pid" || status=$?
    echo "[$(date +%T)] training step exited with status $status"

    if [ -f "$output_dir/preempted" ]; then
        # SIGTERM means scancel (or a scheduler that requeues by itself): keep the checkpoint, don't come back.
        if [ -n "$got_term" ] || grep -q SIGTERM "$output_dir/preempted"; then
            echo "stopped by SIGTERM after a checkpoint ($(cat "$output_dir/preempted")); submit again to resume"
            exit 0
        fi
        echo "preempted at $(cat "$output_dir/preempted"); requeueing job $JOB_NAME (it resumes from the checkpoint)"
        # JOB_ID_TASK, not $SLURM_JOB_ID: the array task that holds the array's own id would requeue every task
        # of the array (seen on SLURM 22.05: `scontrol requeue <array id>` from task 2 of 0-2 requeued all three).
        scontrol requeue "$JOB_NAME"
        exit 0
    fi
    if [ "$status" -ne 0 ] && [ -d "$output_dir" ]; then
        echo "exit status $status of job $JOB_NAME at $(date "+%F %T"); see its log" >"$output_dir/.failed.tmp" &&
            mv "$output_dir/.failed.tmp" "$output_dir/failed" || true
    fi

    local offline_runs
    mapfile -t offline_runs < <(find "$output_dir" -maxdepth 3 -type d -name 'offline-run-*' 2>/dev/null | sort)
    if [ "${#offline_runs[@]}" -gt 0 ]; then
        echo "W&B ran offline; upload from a machine with internet access:"
        echo "  wandb sync$(printf ' %q' "${offline_runs[@]}")" # quoted for the shell: paths may hold spaces
    fi
    exit "$status"
}
