#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for the tests and for trying the sbatch scripts.
#
#   slurm/local-cluster.sh start [--nodes N]   install slurm-wlm + munge if missing, start N nodes, wait until idle
#   slurm/local-cluster.sh status              daemons and `sinfo`; exit 0 when the cluster answers, 3 when not
#   slurm/local-cluster.sh stop                stop the daemons this script started
#
# Each of the N nodes is its own slurmd (`slurmd -N localI`, own port, NodeAddr=127.0.0.1), so multi-node jobs
# (one srun task per node, rendezvous over loopback) really run. The configuration goes where SLURM looks by
# default (/etc/slurm/slurm.conf on Debian), so plain sinfo/sbatch/squeue/scontrol work in any new shell. No
# systemd and no cgroups: proctrack/linuxproc and task/none work in containers. Debian/Ubuntu (apt) only.
# `start` on a running cluster with the same node count and `stop` on a stopped one do nothing.
set -euo pipefail

STATE_DIR=${SKINLESION_SLURM_DIR:-/var/tmp/skinlesion-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by skinlesion slurm/local-cluster.sh"
CTLD_PORT=6817
FIRST_SLURMD_PORT=6831

usage() {
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

log() { echo "local-cluster: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "run as root (installs packages, writes $CONF)"
        exec sudo --preserve-env=SKINLESION_SLURM_DIR "$0" "$@"
    fi
}

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sinfo munged; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get: install slurm-wlm and munge"
    log "installing slurm-wlm and munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        (umask 077 && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
        chown munge:munge /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE_DIR/munged.ours"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

node_names() {
    local n=$1
    for i in $(seq "$n"); do echo "local$i"; done
}

# alive PIDFILE: true when the pid in PIDFILE is a running process.
alive() {
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

running_nodes() {
    [ -s "$STATE_DIR/nodes" ] && alive "$STATE_DIR/run/slurmctld.pid" && cat "$STATE_DIR/nodes" || echo 0
}

# write_conf N: (re)write slurm.conf for N nodes; status 0 when the file changed, 1 when it was already so.
write_conf() {
    local nodes=$1 host hw
    host=$(hostname -s)
    # CPUs, sockets, cores, threads and RealMemory exactly as slurmd detects them, so nodes register cleanly.
    hw=$(slurmd -C | head -n1 | sed 's/^NodeName=[^ ]* //')
    if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite a real cluster's configuration"
    fi
    mkdir -p "$(dirname "$CONF")" "$STATE_DIR"/{state,spool,run,log}
    {
        echo "$MARKER; edits are overwritten by 'start'"
        cat <<EOF
ClusterName=skinlesion-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MailProg=/bin/true
# Finished jobs stay visible to squeue/scontrol for ~16 s (no accounting database here). It also sets how
# often "sbatch --wait" polls: every 8 s instead of every 32 s with the default of 300.
MinJobAge=16
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
EOF
        local i=0
        for name in $(node_names "$nodes"); do
            echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$((FIRST_SLURMD_PORT + i)) $hw State=UNKNOWN"
            i=$((i + 1))
        done
        echo "PartitionName=debug Nodes=local[1-$nodes] Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF.tmp"
    echo "$nodes" >"$STATE_DIR/nodes"
    if cmp -s "$CONF.tmp" "$CONF"; then
        rm -f "$CONF.tmp"
        return 1 # unchanged
    fi
    mv "$CONF.tmp" "$CONF"
}

wait_idle() {
    local nodes=$1 states
    for _ in $(seq 120); do
        # One line per node; anything but idle/mixed/allocated/completing means "not yet".
        states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
        if [ "$(grep -cE ' (idle|mixed|allocated|completing)$' <<<"$states")" -eq "$nodes" ]; then
            log "up: $nodes node(s) idle"
            return 0
        fi
        # A node that was down when slurmctld last saw it stays down until resumed.
        awk '$2 ~ /^(down|drain)/ {print $1}' <<<"$states" | while read -r name; do
            scontrol update nodename="$name" state=resume 2>/dev/null || true
        done
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "nodes did not become idle within 60 s (logs: $STATE_DIR/log/)"
}

stop_daemons() {
    local pids=() f
    for f in "$STATE_DIR"/run/slurmd-*.pid "$STATE_DIR"/run/slurmctld.pid; do
        alive "$f" && pids+=("$(cat "$f")")
    done
    if [ ${#pids[@]} -gt 0 ]; then
        kill "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 100); do
            local left=0
            for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
            [ $left -eq 0 ] && break
            sleep 0.1
        done
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null; done
        log "stopped slurmctld and slurmd (${#pids[@]} daemons)"
    fi
    rm -f "$STATE_DIR"/run/*.pid "$STATE_DIR/nodes"
}

cmd_start() {
    local nodes=1
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) nodes=${2:-}; shift 2 ;;
            --nodes=*) nodes=${1#--nodes=}; shift ;;
            -h | --help) usage 0 ;;
            *) log "unknown argument: $1"; usage ;;
        esac
    done
    [[ "$nodes" =~ ^[1-9][0-9]?$ ]] || die "--nodes takes a number from 1 to 99, not '$nodes'"
    need_root start --nodes "$nodes"
    mkdir -p "$STATE_DIR"
    install_packages
    start_munge

    local current
    current=$(running_nodes)
    if [ "$current" = "$nodes" ]; then
        if write_conf "$nodes"; then
            log "running with $nodes node(s); configuration changed, reconfiguring"
            scontrol reconfigure
        else
            log "already running with $nodes node(s)"
        fi
    else
        [ "$current" != 0 ] && log "running with $current node(s); restarting with $nodes"
        stop_daemons
        write_conf "$nodes" || true
        # -i: ignore unreadable state from an earlier cluster of another shape instead of refusing to start.
        slurmctld -i
        for name in $(node_names "$nodes"); do
            slurmd -N "$name"
        done
    fi
    wait_idle "$nodes"
    sinfo
}

cmd_stop() {
    need_root stop
    stop_daemons
    if [ -e "$STATE_DIR/munged.ours" ] && [ -s /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$STATE_DIR/munged.ours"
        log "stopped munged"
    fi
}

cmd_status() {
    local f
    echo "configuration: $CONF$(grep -qsF "$MARKER" "$CONF" && echo ' (local cluster)')"
    echo "state:         $STATE_DIR"
    for f in "$STATE_DIR"/run/slurmctld.pid "$STATE_DIR"/run/slurmd-*.pid; do
        [ -e "$f" ] || continue
        if alive "$f"; then
            echo "running:       $(basename "$f" .pid) (pid $(cat "$f"))"
        else
            echo "dead:          $(basename "$f" .pid) (stale pid file)"
        fi
    done
    if sinfo -N 2>/dev/null; then
        return 0
    fi
    echo "not running (start it with: $0 start [--nodes N])"
    return 3
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    -h | --help) usage 0 ;;
    *) usage ;;
esac
