#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on this machine (node "localhost",
# partition "debug") for testing the workflow's Slurm profile.
#
#   sudo .ci/slurm/start-cluster.sh      # idempotent; safe to run repeatedly
#   sudo .ci/slurm/stop-cluster.sh       # stop the daemons again
#
# What it does:
#   1. installs slurm-wlm + munge with apt if the daemons are missing
#   2. writes /etc/slurm/slurm.conf (refuses to overwrite a file it did not write)
#   3. starts munged, slurmctld and `slurmd -N localhost` unless already running
#   4. waits until `sinfo` reports the node as up (idle on a fresh cluster)
#
# No accounting database is run. Job state comes from slurmctld (MinJobAge is
# long, so finished jobs stay visible to `squeue --states=all` and
# `scontrol show job` for an hour) and every finished job is appended to a
# plain-text completion log (JobCompType=jobcomp/filetxt).
# Consequently Snakemake must poll with `--slurm-status-command squeue`.
#
# Environment:
#   FEWSEG_SLURM_ROOT       state/log/pid directory  (default /var/tmp/fewseg-slurm)
#   FEWSEG_SLURM_PARTITION  partition name            (default debug)
#   FEWSEG_SLURM_TIMEOUT    seconds to wait for the node (default 90)
#
# Needs root. Works without systemd.
set -Eeuo pipefail

ROOT=${FEWSEG_SLURM_ROOT:-/var/tmp/fewseg-slurm}
PARTITION=${FEWSEG_SLURM_PARTITION:-debug}
TIMEOUT=${FEWSEG_SLURM_TIMEOUT:-90}
CLUSTER=fewsegci
NODE=localhost
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# Written by fewseg .ci/slurm/start-cluster.sh"
LOG_DIR=$ROOT/log
RUN_DIR=$ROOT/run
MUNGE_LOG=/var/log/munge/munged.log
MUNGE_PID=/run/munge/munged.pid

log() { printf '[start-cluster] %s\n' "$*" >&2; }

show_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" "$MUNGE_LOG"; do
        if [[ -s $f ]]; then
            printf '\n----- last lines of %s -----\n' "$f" >&2
            tail -n 25 "$f" >&2 || true
        fi
    done
}

die() {
    printf '\n[start-cluster] ERROR: %s\n' "$*" >&2
    show_logs
    printf '\n[start-cluster] FAILED. Logs: %s (munge: %s)\n' "$LOG_DIR" "$MUNGE_LOG" >&2
    exit 1
}
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # pid_alive

# ---------------------------------------------------------------- packages
install_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd sinfo sbatch squeue scontrol munged munge unmunge; do
        command -v "$cmd" >/dev/null 2>&1 || missing=1
    done
    if ((missing == 0)); then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed and apt-get is unavailable"
    log "installing slurm-wlm and munge with apt-get"
    # Keep package scripts from trying to start the services themselves.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    local apt_log=$ROOT/apt.log
    if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >"$apt_log" 2>&1; then
        log "apt-get install failed; running apt-get update and retrying"
        { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; } \
            >>"$apt_log" 2>&1 || rc=$?
    fi
    if ((created_policy)); then
        rm -f "$policy"
    fi
    if ((rc != 0)); then
        tail -n 30 "$apt_log" >&2 || true
        die "could not install slurm-wlm/munge (apt log: $apt_log)"
    fi
    for cmd in slurmctld slurmd sinfo sbatch squeue scontrol munged; do
        command -v "$cmd" >/dev/null 2>&1 || die "$cmd still missing after installing slurm-wlm"
    done
}

# ------------------------------------------------------------------- munge
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        log "munged already running"
        return 0
    fi
    id munge >/dev/null 2>&1 || die "user 'munge' does not exist (is the munge package installed?)"
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    install -d -o munge -g munge -m 0700 /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    # A dead munged can leave its socket behind; --force lets a new one take over.
    log "starting munged"
    runuser -u munge -- munged --force || die "munged failed to start"
    local i
    for ((i = 0; i < 50; i++)); do
        munge_works && break
        sleep 0.2
    done
    munge_works || die "munged started but credentials cannot be verified"
    touch "$RUN_DIR/munged.started"   # tells stop-cluster.sh that munged is ours
}

# --------------------------------------------------------------- slurm.conf
detect_node() {
    # Use the hardware slurmd detects, under the node name "localhost", and
    # advertise 80% of physical memory, so the node is never drained for
    # having less memory than configured.
    local hw mem
    hw=$(slurmd -C 2>/dev/null | head -n 1) || true
    [[ $hw == NodeName=* ]] || die "slurmd -C did not report the node hardware: '$hw'"
    mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    [[ -n $mem ]] || die "could not parse RealMemory from slurmd -C: $hw"
    NODE_LINE=$(sed -e "s/^NodeName=[^ ]*/NodeName=$NODE/" \
        -e "s/ RealMemory=[0-9]*/ RealMemory=$((mem * 8 / 10))/" <<<"$hw")
    NODE_LINE="$NODE_LINE State=UNKNOWN"
}

render_conf() {
    local mem_per_cpu=512
    cat <<EOF
$MARKER
# One-node test cluster. Regenerated on every start; do not edit by hand.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
# No cgroups: plain process tracking; task/affinity keeps srun's --cpu-bind happy.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that requests no memory is given the whole node.
DefMemPerCPU=$mem_per_cpu
ReturnToService=2
# No slurmdbd: keep finished jobs in slurmctld for an hour (squeue/scontrol)
# and append every finished job to a text log.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
MinJobAge=3600
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
$NODE_LINE
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

write_conf() {
    mkdir -p "$CONF_DIR"
    if [[ -e $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    local new
    new=$(render_conf)
    if [[ -e $CONF ]] && [[ "$(cat "$CONF")" == "$new" ]]; then
        CONF_CHANGED=0
    else
        printf '%s\n' "$new" >"$CONF.tmp"
        mv -f "$CONF.tmp" "$CONF"
        CONF_CHANGED=1
        log "wrote $CONF"
    fi
}

# --------------------------------------------------------------- daemons
wait_ctld() {
    local i
    for ((i = 0; i < TIMEOUT * 2; i++)); do
        if scontrol ping 2>/dev/null | grep -q 'is UP'; then
            return 0
        fi
        pid_alive "$RUN_DIR/slurmctld.pid" slurmctld || ((i < 10)) ||
            die "slurmctld exited during start-up"
        sleep 0.5
    done
    die "slurmctld did not answer 'scontrol ping' within ${TIMEOUT}s"
}

start_slurm() {
    local ctld_up=0 slurmd_up=0
    pid_alive "$RUN_DIR/slurmctld.pid" slurmctld && ctld_up=1
    pid_alive "$RUN_DIR/slurmd.pid" slurmd && slurmd_up=1
    if ((CONF_CHANGED && (ctld_up || slurmd_up))); then
        log "slurm.conf changed: restarting the daemons"
        "$(dirname "$0")/stop-cluster.sh" --keep-munge
        ctld_up=0 slurmd_up=0
    fi
    if ((ctld_up)); then
        log "slurmctld already running (pid $(cat "$RUN_DIR/slurmctld.pid"))"
    else
        log "starting slurmctld"
        # -i: tolerate state files left behind by an unclean stop.
        slurmctld -i || die "slurmctld failed to start"
    fi
    wait_ctld
    if ((slurmd_up)); then
        log "slurmd already running (pid $(cat "$RUN_DIR/slurmd.pid"))"
    else
        log "starting slurmd -N $NODE"
        slurmd -N "$NODE" || die "slurmd failed to start"
    fi
}

wait_node() {
    local i state="" resumed=0
    for ((i = 0; i < TIMEOUT * 2; i++)); do
        state=$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1) || state=""
        case $state in
        idle | mixed | allocated | completing)
            log "node $NODE is $state"
            return 0
            ;;
        down* | drain* | fail*)
            # Left over from an earlier unclean stop; the node is registered again.
            if ((!resumed)) && pid_alive "$RUN_DIR/slurmd.pid" slurmd && ((i > 4)); then
                log "node is $state; resuming it"
                scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
                resumed=1
            fi
            ;;
        esac
        if ((i > 10)) && ! pid_alive "$RUN_DIR/slurmd.pid" slurmd; then
            die "slurmd is not running (node state '${state:-unknown}')"
        fi
        sleep 0.5
    done
    die "node $NODE not up within ${TIMEOUT}s (state '${state:-unknown}'; reason: $(sinfo -h -R -o '%E' 2>/dev/null || true))"
}

# ------------------------------------------------------------------- main
[[ $(id -u) -eq 0 ]] || die "must run as root"
START=$(date +%s)
mkdir -p "$ROOT" "$LOG_DIR" "$RUN_DIR" "$ROOT/state" "$ROOT/spool"
install_packages
start_munge
CONF_CHANGED=0
NODE_LINE=
detect_node
write_conf
start_slurm
wait_node

sinfo >&2
log "cluster up in $(($(date +%s) - START))s"
log "config:          $CONF"
log "slurmctld log:   $LOG_DIR/slurmctld.log"
log "slurmd log:      $LOG_DIR/slurmd.log"
log "job completions: $LOG_DIR/jobcomp.log"
log "munged log:      $MUNGE_LOG"
log "stop with:       $(dirname "$0")/stop-cluster.sh"
