# Shared by start-cluster.sh and stop-cluster.sh (sourced, not run).

# pid_alive PIDFILE NAME: true if the pid file names a live process called NAME.
# A zombie (state Z/X) is dead: killed daemons are re-parented to PID 1, which
# may take a while to reap them, and `kill -0` alone would still succeed.
pid_alive() {
    local pidfile=$1 name=$2 pid stat state comm
    [[ -r $pidfile ]] || return 1
    pid=$({ tr -dc '0-9' <"$pidfile"; } 2>/dev/null)
    [[ -n $pid ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    state=${stat##*) }
    state=${state%% *}
    [[ $state == Z || $state == X ]] && return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name" ]]
}
