#!/usr/bin/env bash
# Stop the one-node test cluster started by .ci/slurm/start-cluster.sh.
#
#   .ci/slurm/stop-cluster.sh [--keep-munge] [--purge]
#
#   --keep-munge  leave munged running
#   --purge       also delete the cluster's state, logs and /etc/slurm/slurm.conf
#
# Cancels remaining jobs, asks slurmctld to shut down both daemons, and falls
# back to SIGTERM/SIGKILL by pid. munged is only stopped if start-cluster.sh
# started it. Idempotent: stopping a stopped cluster succeeds.
set -Eeuo pipefail

ROOT=${FEWSEG_SLURM_ROOT:-/var/tmp/fewseg-slurm}
RUN_DIR=$ROOT/run
CONF=/etc/slurm/slurm.conf
MARKER="# Written by fewseg .ci/slurm/start-cluster.sh"
MUNGE_PID=/run/munge/munged.pid

KEEP_MUNGE=0
PURGE=0
for arg in "$@"; do
    case $arg in
    --keep-munge) KEEP_MUNGE=1 ;;
    --purge) PURGE=1 ;;
    *)
        echo "usage: $0 [--keep-munge] [--purge]" >&2
        exit 2
        ;;
    esac
done

log() { printf '[stop-cluster] %s\n' "$*" >&2; }
die() {
    printf '[stop-cluster] ERROR: %s\n' "$*" >&2
    exit 1
}
[[ $(id -u) -eq 0 ]] || die "must run as root"

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # pid_alive: zombies count as dead

# wait_dead PIDFILE NAME SECONDS
wait_dead() {
    local i
    for ((i = 0; i < $3 * 5; i++)); do
        pid_alive "$1" "$2" || return 0
        sleep 0.2
    done
    return 1
}

# stop_pid PIDFILE NAME: SIGTERM, then SIGKILL, by the pid in PIDFILE only.
stop_pid() {
    local pidfile=$1 name=$2 pid
    pid_alive "$pidfile" "$name" || return 0
    pid=$({ tr -dc '0-9' <"$pidfile"; } 2>/dev/null)
    log "sending SIGTERM to $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_dead "$pidfile" "$name" 15; then
        log "sending SIGKILL to $name (pid $pid)"
        kill -KILL "$pid" 2>/dev/null || true
        wait_dead "$pidfile" "$name" 5 || die "$name (pid $pid) does not stop"
    fi
}

if pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; then
    jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ') || jobs=""
    if [[ -n ${jobs// /} ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        sleep 2
    fi
    log "scontrol shutdown"
    scontrol shutdown 2>/dev/null || true
    wait_dead "$RUN_DIR/slurmctld.pid" slurmctld 20 || true
fi
wait_dead "$RUN_DIR/slurmd.pid" slurmd 10 || true
stop_pid "$RUN_DIR/slurmctld.pid" slurmctld
stop_pid "$RUN_DIR/slurmd.pid" slurmd
rm -f "$RUN_DIR/slurmctld.pid" "$RUN_DIR/slurmd.pid"

if ((!KEEP_MUNGE)) && [[ -e $RUN_DIR/munged.started ]]; then
    stop_pid "$MUNGE_PID" munged
    rm -f "$RUN_DIR/munged.started"
fi

if ((PURGE)); then
    [[ -n $ROOT && $ROOT != / ]] || die "refusing to purge ROOT='$ROOT'"
    log "removing $ROOT"
    rm -rf -- "$ROOT"
    if [[ -e $CONF ]] && grep -qxF "$MARKER" "$CONF"; then
        rm -f "$CONF"
    fi
fi
log "stopped"
