#!/usr/bin/env bash
# Throughput of ringpen, Pen and HAProxy in front of the local 3-node Galera
# cluster (deploy/galera/cluster.sh), against sysbench straight to node 1.
#
#   deploy/galera/bench.sh              # default run (~25 min)
#   QUICK=1 deploy/galera/bench.sh      # ROUNDS=1 TIME=5 WARMUP=1: a check that all works
#   deploy/galera/bench.sh failover     # the failover run instead (failover.sh)
#
# Workloads (sysbench 1.0, tables sbtest1..$TABLES of $TABLE_SIZE rows,
# prepared once on node 1 when missing):
#   oltp_read_only   persistent connections, sysbench's read-only transaction
#   oltp_read_write  persistent connections, read/write transaction (deadlock
#                    errors from Galera certification are retried by sysbench
#                    and counted)
#   conn_per_trx     conn_per_trx.lua: connect, BEGIN, 2 point selects,
#                    COMMIT, disconnect, per event
# Paths: see lib.sh (ringpen with --check galera, ringpen-plain, pen,
# haproxy with mysql-check, ringpen-node1 and pen-node1 = the hop in front
# of node 1 alone, direct = node 1 only, direct-all = sysbench's
# own round robin over the three nodes). Each measurement gets a freshly started
# balancer; the order of the paths rotates from round to round. Every
# balancer is pinned to CPU $BAL_CPU (taskset); mariadbd and sysbench are not
# pinned (they share both CPUs, the balancer's too), so a balancer pays for
# its CPU time in database and client throughput, as on a shared host.
#
# Reported per workload and path (medians over the rounds): TPS and p95
# latency from sysbench's report after the warm-up (a checkpoint at WARMUP
# s resets sysbench's counters), both also as ratios to direct, the
# balancer's CPU use (utime+stime from /proc over the run, % of one CPU),
# and failed connects / transactions (conn_per_trx; from the script's own
# counters), sysbench's retried deadlocks, the share of queries each node
# got. Markdown on stdout; JSON (with every round) in
# benches/results/galera-<date>.json.
#
# Knobs (environment): ROUNDS [3] TIME [20] WARMUP [3] THREADS [8]
# TABLES [4] TABLE_SIZE [10000] PATHS ["ringpen ringpen-plain pen haproxy
# direct direct-all"] WORKLOADS ["oltp_read_only oltp_read_write conn_per_trx"]
# BAL_CPU [0] RINGPEN_WORKERS [1] RINGPEN_EXTRA [none] CHECK_INTERVAL [1] QUICK [unset]
# GALERA_DIR [/tmp/ringpen-galera] KEEP_TMP [unset: delete raw files]
# RINGPEN [target/release/ringpen] BUILD [0; 1: rebuild a stale ringpen]
# RESULTS [benches/results] PREPARE [auto; 1: always recreate tables]
# QUIET_WAIT [60] QUIET_MAX [0.15]: before each measurement, wait up to
# QUIET_WAIT s for all CPUs to be less than QUIET_MAX busy (the machine may
# be shared); a measurement started on a busy machine is flagged.
set -euo pipefail
if [ "${1:-}" = failover ]; then shift; exec "$(dirname "$0")/failover.sh" "$@"; fi
[ $# -eq 0 ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
# shellcheck source=deploy/galera/lib.sh
. "$(dirname "$0")/lib.sh"

if [ -n "${QUICK:-}" ]; then
    ROUNDS=${ROUNDS:-1} TIME=${TIME:-5} WARMUP=${WARMUP:-1}
fi
ROUNDS=${ROUNDS:-3}
TIME=${TIME:-20}
WARMUP=${WARMUP:-3}
THREADS=${THREADS:-8}
TABLES=${TABLES:-4}
TABLE_SIZE=${TABLE_SIZE:-10000}
PATHS=${PATHS:-ringpen ringpen-plain pen haproxy direct direct-all}
WORKLOADS=${WORKLOADS:-oltp_read_only oltp_read_write conn_per_trx}
RESULTS=${RESULTS:-$REPO_ROOT/benches/results}
BUCKET_MS=10

ensure_packages
ensure_ringpen
for p in $PATHS; do path_port "$p" >/dev/null; done
[ "$(nproc)" -gt "$BAL_CPU" ] || die "no CPU $BAL_CPU"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if ! cluster_healthy; then
    log "cluster not healthy: deploy/galera/cluster.sh start"
    "$GALERA_KIT/cluster.sh" start "$BASE" >&2
fi

SB_CONN=(--db-driver=mysql --mysql-host=127.0.0.1 --mysql-user="$SB_USER" --mysql-password="$SB_PASSWORD"
    --mysql-db=sbtest --tables="$TABLES" --table-size="$TABLE_SIZE")

if [ "${PREPARE:-auto}" = 1 ] || ! tables_ready; then
    log "preparing $TABLES tables of $TABLE_SIZE rows on node 1"
    timeout 300 sysbench oltp_read_only "${SB_CONN[@]}" --mysql-port="$(node_port 1)" cleanup >/dev/null
    timeout 600 sysbench oltp_read_only "${SB_CONN[@]}" --mysql-port="$(node_port 1)" --threads="$TABLES" prepare >/dev/null
    wait_cluster_healthy 120 || die "cluster not healthy after prepare"
fi

STAMP=$(date +%Y-%m-%dT%H%M%S)
WORK=$(mktemp -d /tmp/ringpen-galera-bench.XXXXXX)
SB_PID=
cleanup() {
    [ -z "$SB_PID" ] || stop_pid "$SB_PID" 3
    stop_balancer 3
    if [ -z "${KEEP_TMP:-}" ]; then rm -rf "$WORK"; else log "raw files kept in $WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

{
    echo "date=$(date +%Y-%m-%dT%H:%M:%S%z)"
    echo "clk_tck=$(getconf CLK_TCK)"
    echo "param_rounds=$ROUNDS"
    echo "param_time_s=$TIME"
    echo "param_warmup_s=$WARMUP"
    echo "param_threads=$THREADS"
    echo "param_tables=$TABLES"
    echo "param_table_size=$TABLE_SIZE"
    echo "param_paths=$PATHS"
    echo "param_workloads=$WORKLOADS"
    balancer_params_env
    echo "param_pinning=balancer on CPU $BAL_CPU (taskset); mariadbd x3 and sysbench unpinned"
    versions_env
    # shellcheck disable=SC2086 # PATHS is a word list
    balancer_cmds_env $PATHS
} >"$WORK/env.txt"

node_questions() {
    local n
    for ((n = 1; n <= NODES; n++)); do node_status "$n" Questions; done | tr '\n' ' '
}

run_one() { # round workload path
    local round=$1 w=$2 path=$3 dir port t0 t1 ticks0=0 ticks1=0 rc=0 q0 q1 alive=1 n quiet BAL_PID_RUN
    dir="$WORK/runs/$(printf 'r%02d' "$round")-$w-$path"
    mkdir -p "$dir"
    port=$(path_port "$path")
    quiet=$(wait_quiet)
    start_balancer "$path" "$dir"
    local args=("${SB_CONN[@]}" --mysql-port="$port" --threads="$THREADS"
        --time=$((WARMUP + TIME)) --report-checkpoints="$WARMUP" --percentile=95 --forced-shutdown=10)
    local script=$w
    if [ "$w" = conn_per_trx ]; then
        script=$GALERA_KIT/conn_per_trx.lua
        mkdir -p "$dir/progress"
        args+=(--progress-dir="$dir/progress" --bucket-ms="$BUCKET_MS")
    fi
    q0=$(node_questions)
    BAL_PID_RUN=$BAL_PID
    [ -z "$BAL_PID" ] || ticks0=$(proc_ticks "$BAL_PID")
    t0=$(date_ms)
    timeout -s KILL $((WARMUP + TIME + 60)) sysbench "$script" "${args[@]}" run >"$dir/sysbench.out" 2>&1 &
    SB_PID=$!
    wait "$SB_PID" || rc=$?
    SB_PID=
    t1=$(date_ms)
    if [ -n "$BAL_PID" ]; then
        ticks1=$(proc_ticks "$BAL_PID")
        kill -0 "$BAL_PID" 2>/dev/null || alive=0
    fi
    q1=$(node_questions)
    stop_balancer
    {
        echo "round=$round"
        echo "cpu_busy_before=$quiet"
        echo "workload=$w"
        echo "path=$path"
        echo "port=$port"
        echo "start_ms=$t0"
        echo "end_ms=$t1"
        echo "sysbench_rc=$rc"
        [ -z "$BAL_PID_RUN" ] || echo "bal_ticks=$((ticks1 - ticks0))"
        [ -z "$BAL_PID_RUN" ] || echo "bal_alive_after=$alive"
        set -- $q0
        local a=("$@")
        set -- $q1
        for ((n = 1; n <= NODES; n++)); do
            echo "node${n}_questions=$(( ${!n:-0} - ${a[n-1]:-0} ))"
        done
    } >"$dir/meta.txt"
    local tps
    tps=$(grep -o 'transactions: *[0-9]* *([0-9.]* per sec' "$dir/sysbench.out" | tail -1 | sed 's/.*(//; s/ per sec//')
    log "round $round $w $path: ${tps:-?} tps (sysbench rc $rc)$([ "$alive" = 1 ] || echo ', BALANCER DIED')"
    [ "$alive" = 1 ] || tail -n 20 "$dir/balancer.log" >&2 || true
}

read -r -a path_list <<<"$PATHS"
np=${#path_list[@]}
total=$((ROUNDS * $(wc -w <<<"$WORKLOADS") * np))
log "$total measurements of $((WARMUP + TIME)) s: about $((total * (WARMUP + TIME + 3) / 60)) min"
for ((r = 1; r <= ROUNDS; r++)); do
    wi=0
    for w in $WORKLOADS; do
        for ((i = 0; i < np; i++)); do
            # Rotate the order by round and workload, so that no path always
            # runs first (cold) or right after another one.
            p=${path_list[$(((i + r - 1 + wi) % np))]}
            run_one "$r" "$w" "$p"
            if ! cluster_healthy; then
                log "cluster not healthy after $w/$p: waiting (bounded 120 s)"
                wait_cluster_healthy 120 || die "cluster not healthy"
            fi
        done
        wi=$((wi + 1))
    done
done

mkdir -p "$RESULTS"
OUT="$RESULTS/galera-$STAMP.json"
python3 "$GALERA_KIT/report.py" bench "$WORK" "$OUT"
