# shellcheck shell=bash
# Shared by the benchmark scripts in benches/ (udp_compare.sh, compare.sh):
# CPU pinning, tool and port checks, the ringpen build check, processes
# started and stopped by pid, and the quiet-CPU wait (benches/lib.py).
#
# Source it from the repository root after setting BENCH (the script's name,
# for messages) and QUIET_WAIT (seconds wait_quiet waits at most).

BAL_CPU=0  # the balancer under test
LOAD_CPU=1 # load generators, backends, clients
BENCH_LIB_PY=benches/lib.py
export PYTHONDONTWRITEBYTECODE=1 # no benches/__pycache__ from importing lib.py

die() { echo "${BENCH:-bench}: $*" >&2; exit 1; }

need_cpus() {
    [ "$(nproc)" -ge 2 ] || die "needs at least 2 CPUs (balancer on CPU $BAL_CPU, load on CPU $LOAD_CPU)"
}

need_tools() {
    local tool
    for tool; do
        command -v "$tool" >/dev/null || die "$tool not found"
    done
}

# check_ringpen BINARY: builds it when missing; warns when src/ is newer.
check_ringpen() {
    local newest
    if [ ! -x "$1" ]; then
        echo "building ringpen (cargo build --release)..." >&2
        cargo build --release >&2
    fi
    newest=$(find src Cargo.toml -newer "$1" -type f 2>/dev/null | head -1)
    [ -z "$newest" ] || echo "warning: $newest is newer than $1 (run cargo build --release?)" >&2
}

_ss_listen_flags() { case $1 in tcp) echo -Htln ;; udp) echo -Huln ;; *) die "bad protocol $1" ;; esac; }

# port_free tcp|udp PORT: a balancer can bind PORT on 127.0.0.1 (TCP: with
# SO_REUSEADDR, see lib.py bindable; UDP: nothing is bound to it).
port_free() {
    case $1 in
        tcp) python3 "$BENCH_LIB_PY" bindable "$2" ;;
        *) [ -z "$(ss "$(_ss_listen_flags "$1")" "sport = :$2")" ] ;;
    esac
}

# reserve_ports PORT...: the ports lie in Linux's ephemeral range
# (32768-60999), so other processes' outgoing connections take them as
# source ports, and their TIME-WAIT sockets then block a listener's bind for
# a minute.  As root, add them to net.ipv4.ip_local_reserved_ports (on top
# of what is there, and left there, by lib.py reserve_ports, as for
# deploy/galera/lib.sh; this only stops the kernel from picking them for
# outgoing connections).
# RESERVE_PORTS=0 skips it.
reserve_ports() {
    local new
    [ "${RESERVE_PORTS:-1}" = 1 ] && [ -w /proc/sys/net/ipv4/ip_local_reserved_ports ] || return 0
    new=$(python3 "$BENCH_LIB_PY" reserve_ports "$@") || return 0
    [ -z "$new" ] || echo "${BENCH:-bench}: reserved ports $new (net.ipv4.ip_local_reserved_ports)" >&2
}

# hold_ports DIR PORT...: keeps the TCP ports from being handed out as
# ephemeral ports to other processes' outgoing connections for as long as
# the script runs (lib.py hold_ports; waits up to 70 s for a taken port to
# come free, beyond which it fails).
hold_ports() {
    local dir=$1 pid i
    shift
    rm -f "$dir/ports.held"
    python3 "$BENCH_LIB_PY" hold_ports "$dir/ports.held" 70 "$@" &
    pid=$!
    started "$pid"
    for ((i = 0; i < 750; i++)); do
        [ ! -f "$dir/ports.held" ] || return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# wait_port_free tcp|udp PORT [SECONDS]: until port_free (at most 10 s).
wait_port_free() {
    local i
    for ((i = 0; i < ${3:-10} * 10; i++)); do
        port_free "$1" "$2" && return 0
        sleep 0.1
    done
    return 1
}

# wait_listen tcp|udp PORT PID: until something listens on PORT (at most
# 5 s); fails at once if PID dies.
wait_listen() {
    local flags i
    flags=$(_ss_listen_flags "$1")
    for ((i = 0; i < 100; i++)); do
        [ -z "$(ss "$flags" "sport = :$2")" ] || return 0
        kill -0 "$3" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# Until CPUs BAL_CPU and LOAD_CPU are both under 10% busy over 0.5 s (at
# most QUIET_WAIT s).
wait_quiet() {
    run_tracked python3 "$BENCH_LIB_PY" wait_quiet "$BAL_CPU" "$LOAD_CPU" "${QUIET_WAIT:-60}"
}

# The processes the script started (and has not stopped yet): stop_all, at
# exit, stops them by pid.
STARTED_PIDS=()
started() { STARTED_PIDS+=("$1"); }
untrack() {
    local p keep=()
    for p in "${STARTED_PIDS[@]}"; do
        [ "$p" = "$1" ] || keep+=("$p")
    done
    STARTED_PIDS=("${keep[@]}")
}

# run_tracked CMD [ARG...]: runs CMD in the background and waits for it:
# bash runs a trap only once the foreground command has finished, but
# interrupts a wait, so a signal to the script stops it (and, through
# stop_all, CMD with its children) at once.  Returns CMD's exit status.
run_tracked() {
    local pid rc=0
    "$@" &
    pid=$!
    started "$pid"
    wait "$pid" || rc=$?
    untrack "$pid"
    return "$rc"
}

# descendants PID: its children, their children... (one per line).
descendants() {
    local child
    for child in $(pgrep -P "$1" || true); do
        echo "$child"
        descendants "$child"
    done
}

# stop_pid PID [GRACE_S]: SIGTERM, SIGKILL after GRACE_S (default 3) if it
# is still there, then SIGKILL for whatever is left of the descendants it
# had (e.g. nginx workers of a killed master); reaps it.  Must run in the
# shell that started PID (not in $(...)).  Sets STOP_STATUS: stopped (went
# on SIGTERM), ignored_sigterm (needed SIGKILL) or gone (had already
# exited), and STOP_EXIT: its exit status.
# shellcheck disable=SC2034 # STOP_STATUS, STOP_EXIT: read by the scripts
stop_pid() {
    local pid=$1 grace=${2:-3} kids i p
    kids=$(descendants "$pid")
    STOP_STATUS=gone
    if kill -0 "$pid" 2>/dev/null; then
        STOP_STATUS=stopped
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < grace * 20; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        if kill -0 "$pid" 2>/dev/null; then
            STOP_STATUS=ignored_sigterm
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    for p in $kids; do
        [ ! -e "/proc/$p" ] || kill -KILL "$p" 2>/dev/null || true
    done
    if wait "$pid" 2>/dev/null; then STOP_EXIT=0; else STOP_EXIT=$?; fi
    untrack "$pid"
}

# stop_all: stops every process still in STARTED_PIDS (for the EXIT trap).
stop_all() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do
        stop_pid "$pid" 2
    done
}
