#!/usr/bin/env bash
# Failover under load: SIGKILL one Galera node while conn_per_trx.lua runs
# through each balancer, and see what the clients saw.
#
#   deploy/galera/failover.sh            # default: 4 paths x 60 s (+ probes, rejoin), ~6 min
#   deploy/galera/bench.sh failover      # the same
#   QUICK=1 deploy/galera/failover.sh    # DURATION=25 KILL_AT=4 REJOIN_AT=10 HANG_S=5
#
# Per path (ringpen with --check galera, ringpen-plain, pen, haproxy with
# mysql-check; see lib.sh), with the balancer pinned to CPU $BAL_CPU:
#   1. the cluster is made healthy (cluster.sh start, bounded), a fresh
#      balancer is started (ringpen: until its checks say all nodes are up);
#   2. sysbench runs conn_per_trx.lua with THREADS threads for DURATION s,
#      under a watchdog (sysbench --forced-shutdown=5, then timeout -s KILL
#      at DURATION+HANG_S+30 s), so a hung balancer cannot hang this script;
#   3. KILL_AT s into the run, node KILL_NODE gets SIGKILL;
#   4. REJOIN_AT s into the run, the node is restarted under load
#      (cluster.sh start: wsrep recovery, IST; REJOIN_AT=0: after the load);
#      its wsrep_local_state and Connections are sampled once a second;
#   5. after the run, PROBES fresh connections through the balancer (each
#      bounded to 10 s) show whether it still serves new clients; the
#      balancer gets SIGTERM (SIGKILL after 5 s, noted);
#   6. the run waits (bounded by REJOIN_WAIT) until the cluster has 3 Synced
#      nodes again before the next path.
#
# Reported per path (from the per-thread progress files of conn_per_trx.lua,
# 10 ms buckets), failures split into after the kill / after the restart:
#   failed connects   connects that failed (the script retries after 10 ms)
#   failed trx        transactions that connected but then failed
#   longest stall     longest time without any committed transaction, from
#                     the first commit to the end of the load, and where it
#                     began relative to the kill
#   hung              a stall of HANG_S s or more ("never recovered" when it
#                     lasts to the end of the load)
#   TPS before the kill and over the last 10 s of the load
#   restarted node Synced -> in rotation: seconds after the restart until
#                     the node is Synced, and until the balancer sends it
#                     clients again
#   connections per node over the last 10 s of the load
#   probe after       fresh connections through the balancer after the run
# Markdown on stdout; JSON (with a per-second timeline around the kill) in
# benches/results/galera-failover-<date>.json.
#
# Knobs (environment): PATHS ["ringpen ringpen-plain pen haproxy"]
# ROUNDS [1] DURATION [60] KILL_AT [10] REJOIN_AT [20] KILL_NODE [2]
# WRITE [0; 1: an UPDATE in every transaction] THREADS [8]
# HANG_S [10] PROBES [3] REJOIN_WAIT [180] CHECK_INTERVAL [1] BAL_CPU [0]
# RINGPEN_WORKERS [1] RINGPEN_EXTRA [none] TABLES [4] TABLE_SIZE [10000] GALERA_DIR
# [/tmp/ringpen-galera] KEEP_TMP [unset] RESULTS [benches/results] QUICK
# QUIET_WAIT [60] QUIET_MAX [0.15] (wait for an idle machine first, as
# bench.sh)
set -euo pipefail
[ $# -eq 0 ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
# shellcheck source=deploy/galera/lib.sh
. "$(dirname "$0")/lib.sh"

if [ -n "${QUICK:-}" ]; then
    DURATION=${DURATION:-25} KILL_AT=${KILL_AT:-4} REJOIN_AT=${REJOIN_AT:-10} HANG_S=${HANG_S:-5}
fi
PATHS=${PATHS:-ringpen ringpen-plain pen haproxy}
ROUNDS=${ROUNDS:-1}
DURATION=${DURATION:-60}
KILL_AT=${KILL_AT:-10}
REJOIN_AT=${REJOIN_AT:-20}
WRITE=${WRITE:-0}
KILL_NODE=${KILL_NODE:-2}
THREADS=${THREADS:-8}
HANG_S=${HANG_S:-10}
PROBES=${PROBES:-3}
REJOIN_WAIT=${REJOIN_WAIT:-180}
TABLES=${TABLES:-4}
TABLE_SIZE=${TABLE_SIZE:-10000}
RESULTS=${RESULTS:-$REPO_ROOT/benches/results}
BUCKET_MS=10

[ "$KILL_AT" -lt "$DURATION" ] || die "KILL_AT ($KILL_AT) must be less than DURATION ($DURATION)"
[ "$REJOIN_AT" = 0 ] || { [ "$REJOIN_AT" -gt "$KILL_AT" ] && [ "$REJOIN_AT" -lt "$DURATION" ]; } ||
    die "REJOIN_AT ($REJOIN_AT) must be 0 (restart after the load) or between KILL_AT and DURATION"
[[ "$KILL_NODE" =~ ^[1-3]$ ]] || die "KILL_NODE must be 1, 2 or 3"
ensure_packages
ensure_ringpen
for p in $PATHS; do
    case "$p" in direct | direct-all) die "failover measures balancers: '$p' is not one (PATHS)" ;; esac
    path_port "$p" >/dev/null
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

restart_cluster() {
    timeout $((REJOIN_WAIT + 120)) env START_WAIT="$REJOIN_WAIT" "$GALERA_KIT/cluster.sh" start "$BASE"
}
if ! cluster_healthy; then
    log "cluster not healthy: deploy/galera/cluster.sh start"
    restart_cluster >&2 || die "cannot start the cluster"
fi
if ! tables_ready; then
    log "preparing $TABLES tables of $TABLE_SIZE rows on node 1"
    SB=(--db-driver=mysql --mysql-host=127.0.0.1 --mysql-port="$(node_port 1)" --mysql-user="$SB_USER"
        --mysql-password="$SB_PASSWORD" --mysql-db=sbtest --tables="$TABLES" --table-size="$TABLE_SIZE")
    timeout 300 sysbench oltp_read_only "${SB[@]}" cleanup >/dev/null
    timeout 600 sysbench oltp_read_only "${SB[@]}" --threads="$TABLES" prepare >/dev/null
fi

STAMP=$(date +%Y-%m-%dT%H%M%S)
WORK=$(mktemp -d /tmp/ringpen-galera-failover.XXXXXX)
SB_PID=
RJ_PID=
SAMPLER_PID=
cleanup() {
    [ -z "$SB_PID" ] || stop_pid "$SB_PID" 3
    stop_balancer 3
    [ -z "$RJ_PID" ] || stop_pid "$RJ_PID" 3
    [ -z "$SAMPLER_PID" ] || stop_pid "$SAMPLER_PID" 3
    if [ -z "${KEEP_TMP:-}" ]; then rm -rf "$WORK"; else log "raw files kept in $WORK"; fi
    if ! cluster_healthy; then
        log "note: the cluster is not complete; deploy/galera/cluster.sh start restarts the missing node"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

{
    echo "date=$(date +%Y-%m-%dT%H:%M:%S%z)"
    echo "param_paths=$PATHS"
    echo "param_rounds=$ROUNDS"
    echo "param_duration_s=$DURATION"
    echo "param_kill_at_s=$KILL_AT"
    echo "param_kill_node=$KILL_NODE"
    echo "param_rejoin_at_s=$REJOIN_AT"
    echo "param_write=$WRITE"
    echo "param_threads=$THREADS"
    echo "param_hang_s=$HANG_S"
    echo "param_probes=$PROBES"
    balancer_params_env
    echo "param_fail_sleep_ms=10"
    echo "param_workload=conn_per_trx.lua: connect, BEGIN, 2 point selects,$([ "$WRITE" = 1 ] && echo ' 1 UPDATE,') COMMIT, disconnect"
    versions_env
    # shellcheck disable=SC2086 # PATHS is a word list
    balancer_cmds_env $PATHS
} >"$WORK/env.txt"

# Sleeps until the wall clock reaches $1 (ms since the epoch).
sleep_until_ms() {
    local left=$(($1 - $(date_ms)))
    [ "$left" -le 0 ] || sleep "$(awk -v ms="$left" 'BEGIN{printf "%.3f", ms / 1000}')"
}

# Connections counter of every node ("-" for a node that does not answer).
node_connections() {
    local n v
    for ((n = 1; n <= NODES; n++)); do
        v=$(node_status "$n" Connections)
        printf '%s ' "${v:--}"
    done
}

run_one() { # round path
    local round=$1 path=$2 dir port t0 t1 kill_ms restart_ms="" rc=0 alive=1 sigkill=0 ok=0 i pid names="" rejoin=""
    local ticks0 ticks1 health="" conns0="" conns1="" rj_rc rj_ms v quiet
    dir="$WORK/runs/$(printf 'r%02d' "$round")-$path"
    mkdir -p "$dir/progress"
    port=$(path_port "$path")
    if ! cluster_healthy; then
        log "cluster not healthy before $path: cluster.sh start"
        restart_cluster >"$dir/cluster-before.log" 2>&1 || { cat "$dir/cluster-before.log" >&2; die "cannot restore the cluster"; }
    fi
    quiet=$(wait_quiet)
    start_balancer "$path" "$dir"
    log "$path: ${DURATION}s of conn_per_trx through 127.0.0.1:$port; node $KILL_NODE SIGKILLed at ${KILL_AT}s$([ "$REJOIN_AT" = 0 ] || echo ", restarted at ${REJOIN_AT}s")"
    t0=$(date_ms)
    timeout -s KILL $((DURATION + HANG_S + 30)) sysbench "$GALERA_KIT/conn_per_trx.lua" \
        --db-driver=mysql --mysql-host=127.0.0.1 --mysql-port="$port" --mysql-user="$SB_USER" \
        --mysql-password="$SB_PASSWORD" --mysql-db=sbtest --tables="$TABLES" --table-size="$TABLE_SIZE" \
        --threads="$THREADS" --time="$DURATION" --forced-shutdown=5 --report-interval=1 \
        --write="$([ "$WRITE" = 1 ] && echo on || echo off)" \
        --progress-dir="$dir/progress" --bucket-ms="$BUCKET_MS" run >"$dir/sysbench.out" 2>&1 &
    SB_PID=$!
    sleep_until_ms $((t0 + 1000 * KILL_AT))
    pid=$(node_pid "$KILL_NODE") || die "node $KILL_NODE is not running"
    kill -KILL "$pid"
    kill_ms=$(date_ms)
    ticks0=$(proc_ticks "$BAL_PID")
    log "$path: node $KILL_NODE (pid $pid) killed"
    # Once a second until the load ends: the killed node's wsrep_local_state
    # and Connections counter (when it answers), to see when it is Synced
    # again and when the balancer sends it clients again.
    (
        while kill -0 "$SB_PID" 2>/dev/null && [ "$(date_ms)" -lt $((t0 + 1000 * (DURATION + 5))) ]; do
            v=$(node_sql "$KILL_NODE" "SHOW GLOBAL STATUS WHERE Variable_name IN ('Connections','wsrep_local_state')" 2>/dev/null |
                awk '{a[$1]=$2} END{print a["wsrep_local_state"]+0, a["Connections"]+0}' || true)
            echo "$(date_ms) ${v:-0 0}"
            sleep 1
        done
    ) >"$dir/killed_node.txt" 2>/dev/null &
    SAMPLER_PID=$!
    if [ "$REJOIN_AT" -gt 0 ]; then
        sleep_until_ms $((t0 + 1000 * REJOIN_AT))
        restart_ms=$(date_ms)
        log "$path: restarting node $KILL_NODE under load"
        (
            rc=0
            restart_cluster >"$dir/rejoin.log" 2>&1 || rc=$?
            echo "$rc $(date_ms)" >"$dir/rejoin.done"
        ) &
        RJ_PID=$!
    fi
    if [ "$DURATION" -gt $((REJOIN_AT + 10)) ] && [ "$DURATION" -gt $((KILL_AT + 10)) ]; then
        sleep_until_ms $((t0 + 1000 * (DURATION - 10)))
        kill -0 "$SB_PID" 2>/dev/null && conns0=$(node_connections)
    fi
    wait "$SB_PID" || rc=$?
    SB_PID=
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=
    t1=$(date_ms)
    [ -z "$conns0" ] || conns1=$(node_connections)
    ticks1=$(proc_ticks "$BAL_PID")
    [ "$path" != ringpen ] ||
        health=$(timeout 3 penctl "127.0.0.1:$CTL_PORT" health 2>&1 | sed 's/^[0-9]* addr //' | tr '\n' ';' || true)
    # Fresh clients after the run: does the balancer still serve?
    for ((i = 0; i < PROBES; i++)); do
        local name
        if name=$(timeout 10 mariadb --no-defaults -h127.0.0.1 -P"$port" -u"$SB_USER" -p"$SB_PASSWORD" \
            --connect-timeout=5 -N -B -e 'SELECT @@wsrep_node_name' </dev/null 2>>"$dir/probe.err"); then
            ok=$((ok + 1))
            names+="${names:+,}$name"
        fi
    done
    kill -0 "$BAL_PID" 2>/dev/null || alive=0
    if [ "$alive" = 1 ]; then
        kill -TERM "$BAL_PID" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$BAL_PID" 2>/dev/null || break
            [ "$(awk '{print $3}' "/proc/$BAL_PID/stat" 2>/dev/null)" != Z ] || break
            sleep 0.1
        done
        if kill -0 "$BAL_PID" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$BAL_PID/stat" 2>/dev/null)" != Z ]; then
            sigkill=1
            kill -KILL "$BAL_PID" 2>/dev/null || true
        fi
    fi
    wait "$BAL_PID" 2>/dev/null || true
    BAL_PID=
    log "$path: sysbench rc $rc, probes $ok/$PROBES ok ($names)"
    if [ -n "$RJ_PID" ]; then
        wait "$RJ_PID" || true # bounded: restart_cluster runs under timeout
        RJ_PID=
        read -r rj_rc rj_ms <"$dir/rejoin.done" || rj_rc=1
        [ "$rj_rc" != 0 ] || rejoin=$(((rj_ms - restart_ms) / 1000))
    else
        restart_ms=$(date_ms)
        log "$path: restarting node $KILL_NODE"
        if restart_cluster >"$dir/rejoin.log" 2>&1; then rejoin=$((($(date_ms) - restart_ms) / 1000)); fi
    fi
    if [ -n "$rejoin" ]; then
        log "$path: node $KILL_NODE rejoined, cluster Synced ${rejoin}s after its restart"
    else
        tail -n 20 "$dir/rejoin.log" >&2 || true
        log "$path: node $KILL_NODE did NOT rejoin within the bound"
    fi
    {
        echo "round=$round"
        echo "cpu_busy_before=$quiet"
        echo "label=$path"
        echo "path=$path"
        echo "port=$port"
        echo "start_ms=$t0"
        echo "kill_ms=$kill_ms"
        [ "$REJOIN_AT" = 0 ] || echo "restart_ms=$restart_ms"
        echo "end_ms=$t1"
        echo "duration_s=$DURATION"
        echo "sysbench_rc=$rc"
        echo "probes=$PROBES"
        echo "probe_ok=$ok"
        echo "probe_nodes=$names"
        echo "bal_alive_after=$alive"
        echo "bal_needed_sigkill=$sigkill"
        echo "bal_cpu_pct_after_kill=$(awk -v t="$((ticks1 - ticks0))" -v hz="$(getconf CLK_TCK)" -v ms="$((t1 - kill_ms))" 'BEGIN{printf "%.1f", (ms > 0 ? 100 * t / hz / (ms / 1000) : 0)}')"
        [ -z "$health" ] || echo "ringpen_health_at_end=$health"
        [ -z "$conns1" ] || echo "node_connections_last10s_before=$conns0"
        [ -z "$conns1" ] || echo "node_connections_last10s_after=$conns1"
        [ -z "$rejoin" ] || echo "rejoin_s=$rejoin"
    } >"$dir/meta.txt"
    [ -n "$rejoin" ] || die "the cluster did not recover; stopping here"
}

read -r -a path_list <<<"$PATHS"
np=${#path_list[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < np; i++)); do
        run_one "$r" "${path_list[$(((i + r - 1) % np))]}"
    done
done

mkdir -p "$RESULTS"
OUT="$RESULTS/galera-failover-$STAMP.json"
python3 "$GALERA_KIT/report.py" failover "$WORK" "$OUT"
