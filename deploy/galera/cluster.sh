#!/usr/bin/env bash
# A 3-node MariaDB Galera cluster on one machine, loopback only.
#
#   deploy/galera/cluster.sh start  [DIR]   start (or complete) the cluster
#   deploy/galera/cluster.sh stop   [DIR]   stop every node (SIGTERM by pid, bounded)
#   deploy/galera/cluster.sh status [DIR]   one line per node; exit 0 when healthy
#   deploy/galera/cluster.sh kill N [DIR]   SIGKILL node N (what failover.sh does)
#   deploy/galera/cluster.sh sql N 'STATEMENTS' [DIR]   run SQL as root on node N
#   deploy/galera/cluster.sh reset  [DIR]   stop, then delete DIR
#
# DIR defaults to $GALERA_DIR or /tmp/ringpen-galera. Node N (1..3):
#   client 127.0.0.1:3306N (33061..33063), socket DIR/nodeN/mysqld.sock
#   Galera 127.0.0.1:34567/34577/34587, IST on that +1, rsync SST on that +2
#   data in DIR/nodeN/data, log DIR/nodeN/error.log, pid DIR/nodeN/pid
#
# start: writes DIR/nodeN/my.cnf, initialises empty data directories, and
#   - when no node runs: bootstraps one node with --wsrep-new-cluster (node 1
#     on a new cluster; otherwise the node Galera marked safe_to_bootstrap,
#     or the one with the highest recovered seqno),
#   - starts every node that is not running, one at a time, each joining the
#     running ones (IST when possible, rsync SST otherwise); a node that was
#     killed first gets its position from mariadbd --wsrep-recover,
#   - waits (bounded: START_WAIT s per node, default 180) until
#     wsrep_cluster_size=3 and all nodes are Synced,
#   - creates (idempotently) database sbtest, user 'sbtest'@'127.0.0.1'
#     (password $SB_PASSWORD, default sbtest, all privileges on sbtest.*),
#     'ringpen_check'@'127.0.0.1' with a generated password kept in
#     DIR/check.pw (no privileges: what ringpen's --check galera logs in as),
#     and 'haproxy_check'@'127.0.0.1' without password or privileges (for
#     HAProxy's option mysql-check).
# Missing packages (mariadb-server galera-4 sysbench rsync pen haproxy) are
# installed with apt-get first.
set -euo pipefail
# shellcheck source=deploy/galera/lib.sh
. "$(dirname "$0")/lib.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
node_arg=
sql_arg=
case "$cmd" in
    kill) node_arg=${1:-}; shift || true ;;
    sql)
        [ $# -ge 2 ] || die "usage: cluster.sh sql NODE 'STATEMENT' [DIR]"
        node_arg=$1; sql_arg=$2; shift 2 ;;
esac
if [ -n "${1:-}" ]; then BASE=$1; fi
case "$BASE" in /*) ;; *) BASE=$PWD/$BASE ;; esac
START_WAIT=${START_WAIT:-180}
STOP_WAIT=${STOP_WAIT:-60}
MARIADBD=$(command -v mariadbd || echo /usr/sbin/mariadbd)
# As root, the servers run as the package's system user "mysql": the rsync
# SST's receiving rsync daemon, started by the joiner, would drop root to
# "nobody" and then cannot write the joiner's data directory.
RUN_USER=
if [ "$(id -u)" -eq 0 ]; then RUN_USER=${RUN_USER_OVERRIDE:-mysql}; fi

write_cnf() {
    local n=$1 d gp cluster="" m
    d=$(node_dir "$n")
    gp=$(node_gport "$n")
    for ((m = 1; m <= NODES; m++)); do
        cluster+="${cluster:+,}127.0.0.1:$(node_gport "$m")"
    done
    mkdir -p "$d/tmp"
    [ -z "$RUN_USER" ] || chown "$RUN_USER:" "$d" "$d/tmp"
    cat >"$d/my.cnf" <<EOF
# Written by deploy/galera/cluster.sh: node $n of a loopback test cluster.
[mysqld]
$( [ -n "$RUN_USER" ] && echo "user=$RUN_USER" )
datadir=$d/data
tmpdir=$d/tmp
socket=$d/mysqld.sock
pid-file=$d/mariadbd.pid
log-error=$d/error.log
port=$(node_port "$n")
bind-address=127.0.0.1
skip-name-resolve
max_connections=1000
max_connect_errors=1000000
performance_schema=OFF
innodb_buffer_pool_size=$BUFFER_POOL
innodb_log_file_size=64M
# Durability comes from replication in this test cluster.
innodb_flush_log_at_trx_commit=2
innodb_autoinc_lock_mode=2
default_storage_engine=InnoDB
binlog_format=ROW
wsrep_on=ON
wsrep_provider=$GALERA_PROVIDER
wsrep_cluster_name=ringpen-galera
wsrep_cluster_address=gcomm://$cluster
wsrep_node_name=node$n
wsrep_node_address=127.0.0.1
wsrep_provider_options="base_port=$gp;gmcast.listen_addr=tcp://127.0.0.1:$gp;ist.recv_addr=127.0.0.1:$((gp + 1));gcache.size=64M"
wsrep_sst_method=rsync
wsrep_sst_receive_address=127.0.0.1:$((gp + 2))
wsrep_slave_threads=2

[client]
socket=$d/mysqld.sock
EOF
}

init_node() {
    local n=$1 d
    d=$(node_dir "$n")
    write_cnf "$n"
    if [ ! -d "$d/data/mysql" ]; then
        log "node $n: mariadb-install-db into $d/data"
        local args=(--no-defaults --datadir="$d/data" --tmpdir="$d/tmp"
            --auth-root-authentication-method=normal --skip-test-db)
        [ -z "$RUN_USER" ] || args+=(--user="$RUN_USER")
        timeout 120 mariadb-install-db "${args[@]}" >"$d/install.log" 2>&1 ||
            { cat "$d/install.log" >&2; die "node $n: mariadb-install-db failed"; }
    fi
}

grastate() { # n field
    sed -n "s/^$2:[[:space:]]*//p" "$(node_dir "$1")/data/grastate.dat" 2>/dev/null || true
}

# Prints node N's recovered position uuid:seqno (empty when unknown): what
# galera_recovery does for the systemd unit after a crash.
recover_position() {
    local n=$1 d
    d=$(node_dir "$n")
    rm -f "$d/recover.log"
    timeout 180 "$MARIADBD" --defaults-file="$d/my.cnf" --wsrep-recover \
        --log-error="$d/recover.log" </dev/null >/dev/null 2>&1 || true
    sed -n 's/.*WSREP: Recovered position: *//p' "$d/recover.log" 2>/dev/null | tail -1
}

# Extra mariadbd arguments for a node that was not shut down cleanly.
start_position_args() {
    local n=$1 pos
    if [ "$(grastate "$n" seqno)" = "-1" ] && [ -n "$(grastate "$n" uuid)" ]; then
        pos=$(recover_position "$n")
        if [ -n "$pos" ] && [ "${pos##*:}" != "-1" ]; then
            log "node $n: recovered position $pos"
            echo "--wsrep-start-position=$pos"
        fi
    fi
}

launch_node() { # n [extra mariadbd args]
    local n=$1 d pid
    shift
    d=$(node_dir "$n")
    rm -f "$d/pid" "$d/mariadbd.pid"
    log "node $n: starting mariadbd $* (port $(node_port "$n"), Galera $(node_gport "$n"))"
    # A background job of a non-interactive shell ignores SIGINT; the
    # server outlives this script and is found again through $d/pid.
    nohup "$MARIADBD" --defaults-file="$d/my.cnf" "$@" </dev/null >>"$d/stdout.log" 2>&1 &
    pid=$!
    echo "$pid" >"$d/pid"
}

# Waits (bounded) until node N is Synced; fails with its log when it exits.
wait_synced() {
    local n=$1 limit=${2:-$START_WAIT} start=$SECONDS state
    while :; do
        if ! node_pid "$n" >/dev/null; then
            tail -n 40 "$(node_dir "$n")/error.log" >&2 || true
            die "node $n: mariadbd exited while starting (log above: $(node_dir "$n")/error.log)"
        fi
        state=$(node_status "$n" wsrep_local_state)
        [ "$state" = 4 ] && { log "node $n: Synced"; return 0; }
        if [ $((SECONDS - start)) -ge "$limit" ]; then
            tail -n 40 "$(node_dir "$n")/error.log" >&2 || true
            die "node $n: not Synced within ${limit}s (wsrep_local_state=${state:-no answer})"
        fi
        sleep 0.5
    done
}

choose_bootstrap() {
    local n best=1 best_seqno=-2 s any=0
    for ((n = 1; n <= NODES; n++)); do
        [ -f "$(node_dir "$n")/data/grastate.dat" ] || continue
        any=1
        if [ "$(grastate "$n" safe_to_bootstrap)" = 1 ]; then echo "$n"; return; fi
    done
    [ "$any" = 1 ] || { echo 1; return; }
    for ((n = 1; n <= NODES; n++)); do
        [ -f "$(node_dir "$n")/data/grastate.dat" ] || continue
        s=$(grastate "$n" seqno)
        if [ "$s" = "-1" ]; then
            s=$(recover_position "$n")
            s=${s##*:}
        fi
        if [ -n "$s" ] && [ "$s" -gt "$best_seqno" ]; then best=$n; best_seqno=$s; fi
    done
    log "no node is marked safe_to_bootstrap: bootstrapping node $best (seqno $best_seqno)"
    sed -i 's/^safe_to_bootstrap:.*/safe_to_bootstrap: 1/' "$(node_dir "$best")/data/grastate.dat"
    echo "$best"
}

# True when the accounts exist and log in with the expected passwords (so a
# restart of one node under load does not replicate DDL for nothing).
accounts_ok() {
    local n=$1 pw port
    port=$(node_port "$n")
    pw=$(cat "$BASE/check.pw" 2>/dev/null) || return 1
    [ -n "$pw" ] || return 1
    timeout 10 mariadb --no-defaults -h127.0.0.1 -P"$port" -u"$SB_USER" -p"$SB_PASSWORD" --connect-timeout=5 \
        -N -B -e 'SELECT 1' sbtest </dev/null >/dev/null 2>&1 || return 1
    timeout 10 mariadb --no-defaults -h127.0.0.1 -P"$port" -u"$CHECK_USER" -p"$pw" --connect-timeout=5 \
        -N -B -e 'SELECT 1' </dev/null >/dev/null 2>&1 || return 1
    [ "$(node_sql "$n" "SELECT COUNT(*) FROM mysql.user WHERE user='$HAPROXY_CHECK_USER' AND host='127.0.0.1'" 2>/dev/null)" = 1 ]
}

setup_accounts() {
    local n=$1 pw
    if accounts_ok "$n"; then
        log "accounts present: $SB_USER, $CHECK_USER (password in $BASE/check.pw), $HAPROXY_CHECK_USER"
        return 0
    fi
    [ -s "$BASE/check.pw" ] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$BASE/check.pw")
    pw=$(cat "$BASE/check.pw")
    node_sql "$n" "
        CREATE DATABASE IF NOT EXISTS sbtest;
        CREATE USER IF NOT EXISTS '$SB_USER'@'127.0.0.1' IDENTIFIED BY '$SB_PASSWORD';
        ALTER USER '$SB_USER'@'127.0.0.1' IDENTIFIED BY '$SB_PASSWORD';
        GRANT ALL ON sbtest.* TO '$SB_USER'@'127.0.0.1';
        CREATE USER IF NOT EXISTS '$CHECK_USER'@'127.0.0.1' IDENTIFIED BY '$pw';
        ALTER USER '$CHECK_USER'@'127.0.0.1' IDENTIFIED BY '$pw';
        CREATE USER IF NOT EXISTS '$HAPROXY_CHECK_USER'@'127.0.0.1';" ||
        die "cannot create the accounts on node $n"
    log "accounts: $SB_USER/$SB_PASSWORD (database sbtest), $CHECK_USER (password in $BASE/check.pw), $HAPROXY_CHECK_USER (no password)"
}

cmd_start() {
    ensure_packages
    [ -z "$RUN_USER" ] || id "$RUN_USER" >/dev/null 2>&1 || die "system user $RUN_USER does not exist (set RUN_USER_OVERRIDE)"
    mkdir -p "$BASE"
    reserve_ports
    local n running=() boot pos_args
    for ((n = 1; n <= NODES; n++)); do
        if node_pid "$n" >/dev/null; then running+=("$n"); fi
    done
    for ((n = 1; n <= NODES; n++)); do
        node_pid "$n" >/dev/null && continue
        for p in "$(node_port "$n")" "$(node_gport "$n")" $(($(node_gport "$n") + 1)) $(($(node_gport "$n") + 2)); do
            ! port_listening "$p" || die "port $p (node $n) is in use by another process"
        done
        init_node "$n"
    done
    if [ ${#running[@]} -eq 0 ]; then
        boot=$(choose_bootstrap)
        pos_args=$(start_position_args "$boot")
        # shellcheck disable=SC2086
        launch_node "$boot" --wsrep-new-cluster $pos_args
        wait_synced "$boot" 120
    fi
    for ((n = 1; n <= NODES; n++)); do
        node_pid "$n" >/dev/null && continue
        pos_args=$(start_position_args "$n")
        # shellcheck disable=SC2086
        launch_node "$n" $pos_args
        wait_synced "$n"
    done
    wait_cluster_healthy "$START_WAIT" || { cmd_status || true; die "cluster not healthy within ${START_WAIT}s"; }
    for ((n = 1; n <= NODES; n++)); do
        if [ "$(node_status "$n" wsrep_local_state)" = 4 ]; then setup_accounts "$n"; break; fi
    done
    cmd_status
}

cmd_stop() {
    local n pid i
    # Last node down is the one Galera marks safe_to_bootstrap: node 1.
    for ((n = NODES; n >= 1; n--)); do
        pid=$(node_pid "$n") || { rm -f "$(node_dir "$n")/pid"; continue; }
        log "node $n: SIGTERM to $pid"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < STOP_WAIT * 10; i++)); do
            [ -d "/proc/$pid" ] || break
            sleep 0.1
        done
        if [ -d "/proc/$pid" ]; then
            log "node $n: still running after ${STOP_WAIT}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
        fi
        rm -f "$(node_dir "$n")/pid"
    done
    log "stopped"
}

cmd_status() {
    local n pid healthy=0 st
    printf '%-5s %-8s %-16s %-16s %-9s %-5s %s\n' node pid client galera state size status
    for ((n = 1; n <= NODES; n++)); do
        pid=$(node_pid "$n") || pid=-
        if [ "$pid" != - ]; then
            st=$(node_sql "$n" "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_local_state_comment','wsrep_cluster_size','wsrep_cluster_status')" 2>/dev/null || true)
        else
            st=
        fi
        printf '%-5s %-8s %-16s %-16s %-9s %-5s %s\n' "$n" "$pid" "127.0.0.1:$(node_port "$n")" \
            "127.0.0.1:$(node_gport "$n")" \
            "$(awk '$1=="wsrep_local_state_comment"{print $2}' <<<"$st")" \
            "$(awk '$1=="wsrep_cluster_size"{print $2}' <<<"$st")" \
            "$(awk '$1=="wsrep_cluster_status"{print $2}' <<<"$st")"
    done
    cluster_healthy || healthy=3
    [ "$healthy" = 0 ] && echo "cluster healthy: $NODES nodes Synced ($BASE)" || echo "cluster NOT healthy ($BASE)"
    return "$healthy"
}

cmd_kill() {
    local n=$1 pid
    [[ "$n" =~ ^[1-9]$ ]] && [ "$n" -le "$NODES" ] || die "kill: node number 1..$NODES expected"
    pid=$(node_pid "$n") || die "node $n is not running"
    log "node $n: SIGKILL to $pid"
    kill -KILL "$pid"
    for ((i = 0; i < 100; i++)); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
}

case "$cmd" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    kill) cmd_kill "$node_arg" ;;
    sql) node_sql "$node_arg" "$sql_arg" ;;
    reset)
        cmd_stop
        # Only a directory this script made: a typo must not delete a home
        # directory or a real datadir.
        head -1 "$BASE/node1/my.cnf" 2>/dev/null | grep -q '^# Written by deploy/galera/cluster.sh' ||
            die "refusing to delete $BASE: it does not hold a cluster made by cluster.sh"
        rm -rf -- "$BASE"
        log "deleted $BASE"
        ;;
    *) usage ;;
esac
