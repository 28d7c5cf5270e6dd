# shellcheck shell=bash
# Shared by cluster.sh, bench.sh and failover.sh (sourced, never run).
#
# Layout of the local 3-node cluster (all on 127.0.0.1):
#   node N   client port 33060+N, Galera group port 34557+10N (34567, 34577,
#            34587), IST port +1, rsync SST port +2,
#            files under $BASE/nodeN/ (my.cnf, data/, tmp/, mysqld.sock,
#            pid = the pid this kit started, error.log)
#   $BASE/check.pw      password of 'ringpen_check'@'127.0.0.1' (mode 600)
# Balancer ports used by bench.sh / failover.sh: 39310-39319 (+39390 for
# ringpen's control port).

GALERA_KIT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$GALERA_KIT/../.." && pwd)
BASE=${GALERA_DIR:-/tmp/ringpen-galera}
NODES=3
DB_PORT0=${DB_PORT0:-33060}        # node N listens on DB_PORT0+N
GALERA_PORT0=${GALERA_PORT0:-34557} # node N: Galera on GALERA_PORT0+10N, IST +1, SST +2
SB_USER=${SB_USER:-sbtest}
SB_PASSWORD=${SB_PASSWORD:-sbtest}
CHECK_USER=ringpen_check
HAPROXY_CHECK_USER=haproxy_check
BUFFER_POOL=${BUFFER_POOL:-128M}
GALERA_PROVIDER=${GALERA_PROVIDER:-/usr/lib/galera/libgalera_smm.so}

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

node_dir()   { echo "$BASE/node$1"; }
node_port()  { echo $((DB_PORT0 + $1)); }
node_gport() { echo $((GALERA_PORT0 + 10 * $1)); }
node_sock()  { echo "$BASE/node$1/mysqld.sock"; }

# The pid of node N's mariadbd if it is running (and really is a mariadbd:
# a stale pid file must never make us signal an unrelated process).
node_pid() {
    local f pid comm
    f="$(node_dir "$1")/pid"
    [ -s "$f" ] || return 1
    pid=$(cat "$f")
    [ -d "/proc/$pid" ] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    case "$comm" in mariadbd|mysqld) echo "$pid" ;; *) return 1 ;; esac
}

# Runs SQL as root over node N's socket; bounded. Prints tab-separated rows.
node_sql() {
    timeout 30 mariadb --no-defaults --socket="$(node_sock "$1")" -uroot \
        --connect-timeout=5 -N -B -e "$2" </dev/null
}

# One status variable of node N (empty when the node does not answer).
node_status() {
    node_sql "$1" "SHOW GLOBAL STATUS LIKE '$2'" 2>/dev/null | cut -f2 || true
}

# Installs what the kit needs from Debian's archive, only what is missing.
ensure_packages() {
    local missing=()
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    command -v mariadb >/dev/null || missing+=(mariadb-client)
    [ -e "$GALERA_PROVIDER" ] || missing+=(galera-4)
    command -v sysbench >/dev/null || missing+=(sysbench)
    command -v rsync >/dev/null || missing+=(rsync)
    command -v pen >/dev/null || missing+=(pen)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v ss >/dev/null || missing+=(iproute2)
    command -v python3 >/dev/null || missing+=(python3)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}); run as root or install them"
    log "installing ${missing[*]} with apt-get"
    # mariadb-server's package scripts start the system service on 3306; the
    # kit does not use it (and does not touch it).
    timeout 600 apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive timeout 1200 apt-get install -y -q "${missing[@]}" >&2
}

# True when something listens on TCP port $1 on any address.
port_listening() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }

# Waits (bounded, $2 s) until TCP port $1 listens.
wait_listening() {
    local port=$1 limit=${2:-10} i
    for ((i = 0; i < limit * 10; i++)); do
        port_listening "$port" && return 0
        sleep 0.1
    done
    return 1
}

# Sends SIGTERM to pid $1, waits up to $2 s (default 10), then SIGKILL.
stop_pid() {
    local pid=$1 limit=${2:-10} i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < limit * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        # A zombie child of ours counts as gone once reaped.
        if [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ]; then
            wait "$pid" 2>/dev/null || true
            return 0
        fi
        sleep 0.1
    done
    log "pid $pid did not exit within ${limit}s of SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 0
}

# utime+stime of pid $1 in clock ticks (0 when gone).
proc_ticks() {
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}

# True when all nodes run, are Synced, and see a cluster of NODES.
cluster_healthy() {
    local n
    for ((n = 1; n <= NODES; n++)); do
        node_pid "$n" >/dev/null || return 1
        [ "$(node_status "$n" wsrep_local_state)" = 4 ] || return 1
        [ "$(node_status "$n" wsrep_cluster_size)" = "$NODES" ] || return 1
        [ "$(node_status "$n" wsrep_cluster_status)" = Primary ] || return 1
    done
}

# Waits (bounded, $1 s) until cluster_healthy.
wait_cluster_healthy() {
    local limit=${1:-120} start=$SECONDS
    while ! cluster_healthy; do
        [ $((SECONDS - start)) -lt "$limit" ] || return 1
        sleep 1
    done
}

date_ms() { date +%s%3N; }

# True when sbtest1..$TABLES exist with at least $TABLE_SIZE rows each (the
# read/write workload's DELETE+INSERT pairs let the counts drift upwards).
tables_ready() {
    local got
    got=$(node_sql 1 "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema='sbtest'
        AND table_name REGEXP '^sbtest[0-9]+\$' AND CAST(SUBSTRING(table_name, 7) AS UNSIGNED) BETWEEN 1 AND $TABLES;
        SELECT COUNT(*) >= $TABLE_SIZE FROM sbtest.sbtest$TABLES" 2>/dev/null | tr '\n' ' ' || true)
    [ "$got" = "$TABLES 1 " ]
}

# The kit's ports (client 33061-33063, Galera/IST/SST 34567-34589, balancers
# 39300-39399) lie in Linux's ephemeral range (32768-60999): an outgoing
# connection may take one of them as its source port, and a node restarting
# a moment later fails with "Bind on TCP/IP port: Address already in use".
# As root, add them to net.ipv4.ip_local_reserved_ports (kept on top of
# what is there; this only stops the kernel from picking them for outgoing
# connections). RESERVE_PORTS=0 skips it.
reserve_ports() {
    local new
    [ "${RESERVE_PORTS:-1}" = 1 ] && [ -w /proc/sys/net/ipv4/ip_local_reserved_ports ] || return 0
    new=$(python3 "$REPO_ROOT/benches/lib.py" reserve_ports "$((DB_PORT0 + 1))-$((DB_PORT0 + NODES))" \
        "$((GALERA_PORT0 + 10))-$((GALERA_PORT0 + 10 * NODES + 2))" 39300-39399) || return 0
    [ -z "$new" ] || log "reserved ports $new (net.ipv4.ip_local_reserved_ports)"
}

# ---------------------------------------------------------------- balancers
#
# Paths (what a client goes through to reach the cluster):
#   ringpen        ringpen -f -r -x 10000 --workers 1 with --check galera
#                  (as ringpen_check, password from $BASE/check.pw), control
#                  port 127.0.0.1:39390 for penctl
#   ringpen-plain  the same without active checks (Pen's passive blacklisting)
#   pen            pen -f -r -x 10000 (no active checks: Pen has none)
#   haproxy        HAProxy, mode tcp, balance roundrobin, option mysql-check
#                  (as haproxy_check), inter 1s fall 2 rise 2, retries 3 +
#                  redispatch; one thread
#   haproxy-plain  the same without health checks
#   ringpen-node1  ringpen-plain in front of node 1 alone, and
#   pen-node1      pen in front of node 1 alone: the hop without the
#                  spread over three nodes, against the same node as direct
#   direct         no balancer: node 1 itself
#   direct-all     no balancer: sysbench spreads its connections over the
#                  three nodes itself (--mysql-port=33061,33062,33063, round
#                  robin), the same spread as the balancers without the hop
# Every balancer runs pinned to CPU $BAL_CPU with taskset; it listens on
# 127.0.0.1:$(path_port PATH) and balances the three nodes in order (the
# -node1 paths: node 1 only).

RINGPEN=${RINGPEN:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/ringpen}
PEN=${PEN:-$(command -v pen || echo /usr/bin/pen)}
HAPROXY=${HAPROXY:-$(command -v haproxy || echo /usr/sbin/haproxy)}
BAL_CPU=${BAL_CPU:-0}
RINGPEN_WORKERS=${RINGPEN_WORKERS:-1}
RINGPEN_EXTRA=${RINGPEN_EXTRA:-}
CHECK_INTERVAL=${CHECK_INTERVAL:-1}
CTL_PORT=39390
BAL_PID=

path_port() {
    case "$1" in
        ringpen) echo 39310 ;;
        ringpen-plain) echo 39311 ;;
        pen) echo 39312 ;;
        haproxy) echo 39313 ;;
        haproxy-plain) echo 39314 ;;
        ringpen-node1) echo 39315 ;;
        pen-node1) echo 39316 ;;
        direct) node_port 1 ;;
        direct-all) echo "$(node_port 1),$(node_port 2),$(node_port 3)" ;;
        *) die "unknown path '$1' (ringpen ringpen-plain pen haproxy haproxy-plain ringpen-node1 pen-node1 direct direct-all)" ;;
    esac
}

# The nodes path $1 balances: all of them, or node 1 for the -node1 paths.
backends() {
    local n
    case "$1" in *-node1) echo "127.0.0.1:$(node_port 1)"; return ;; esac
    for ((n = 1; n <= NODES; n++)); do printf '127.0.0.1:%s ' "$(node_port "$n")"; done
}

# The command line of a path's balancer (one word per line), given a work
# directory for its config files.
balancer_cmd() {
    local path=$1 dir=$2 port n
    port=$(path_port "$path")
    case "$path" in
        ringpen | ringpen-plain | ringpen-node1)
            printf '%s\n' "$RINGPEN" -f -r -x 10000 --workers "$RINGPEN_WORKERS"
            if [ "$path" = ringpen ]; then
                [ "$(id -u)" -ne 0 ] || printf '%s\n' -u root
                printf '%s\n' -C "127.0.0.1:$CTL_PORT" --check galera --check-user "$CHECK_USER" \
                    --check-password-file "$BASE/check.pw" --check-interval "$CHECK_INTERVAL"
            fi
            # RINGPEN_EXTRA: more options for every ringpen path (word-split).
            [ -z "${RINGPEN_EXTRA:-}" ] || printf '%s\n' $RINGPEN_EXTRA
            printf '%s\n' "127.0.0.1:$port" $(backends "$path")
            ;;
        pen | pen-node1)
            printf '%s\n' "$PEN" -f -r -x 10000 "127.0.0.1:$port" $(backends "$path")
            ;;
        haproxy | haproxy-plain)
            local check="" opt=""
            if [ "$path" = haproxy ]; then
                check=" check"
                opt="    option mysql-check user $HAPROXY_CHECK_USER post-41
    default-server inter ${CHECK_INTERVAL}s fall 2 rise 2"
            fi
            # HAProxy wants 2 descriptors per connection: stay within ulimit -n.
            local maxconn nofile
            nofile=$(ulimit -n)
            [ "$nofile" = unlimited ] && nofile=1048576
            maxconn=$(((nofile - 200) / 2))
            [ "$maxconn" -le 10000 ] || maxconn=10000
            {
                cat <<CFG
global
    maxconn $maxconn
    nbthread 1
defaults
    mode tcp
    timeout connect 3s
    timeout client 1h
    timeout server 1h
    retries 3
    option redispatch
frontend galera
    bind 127.0.0.1:$port
    maxconn $maxconn
    default_backend nodes
backend nodes
    balance roundrobin
$opt
CFG
                for ((n = 1; n <= NODES; n++)); do
                    echo "    server node$n 127.0.0.1:$(node_port "$n")$check"
                done
            } >"$dir/haproxy.cfg"
            printf '%s\n' "$HAPROXY" -db -f "$dir/haproxy.cfg"
            ;;
        *) die "no balancer for path $path" ;;
    esac
}

# Starts path $1's balancer on CPU $BAL_CPU (log in $2/balancer.log), sets
# BAL_PID and waits (bounded) until it listens; for ringpen with checks also
# until all nodes are up in its health table.
start_balancer() {
    local path=$1 dir=$2 port cmd i
    BAL_PID=
    case "$path" in direct | direct-all) return 0 ;; esac
    port=$(path_port "$path")
    ! port_listening "$port" || die "port $port ($path) is already in use"
    mapfile -t cmd < <(balancer_cmd "$path" "$dir")
    printf '%s ' "${cmd[@]}" >"$dir/balancer.cmd"
    taskset -c "$BAL_CPU" "${cmd[@]}" </dev/null >"$dir/balancer.log" 2>&1 &
    BAL_PID=$!
    wait_listening "$port" 10 || { cat "$dir/balancer.log" >&2; die "$path did not listen on $port within 10s"; }
    if [ "$path" = ringpen ]; then
        for ((i = 0; i < 150; i++)); do
            [ "$(timeout 3 penctl "127.0.0.1:$CTL_PORT" health 2>/dev/null | grep -c ' health up$')" = "$NODES" ] && return 0
            sleep 0.1
        done
        log "warning: ringpen health not all up within 15s: $(timeout 3 penctl "127.0.0.1:$CTL_PORT" health 2>&1 | tr '\n' ';')"
    fi
}

stop_balancer() {
    [ -n "$BAL_PID" ] || return 0
    stop_pid "$BAL_PID" "${1:-5}"
    BAL_PID=
}

# Version strings, key=value lines for env.txt.
versions_env() {
    echo "version_ringpen_git=$(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "version_ringpen_binary_mtime=$(date -r "$RINGPEN" +%Y-%m-%dT%H:%M:%S 2>/dev/null || echo missing)"
    echo "version_ringpen=$("$RINGPEN" --version 2>/dev/null | head -1)"
    echo "version_pen=$(dpkg-query -W -f '${Version}' pen 2>/dev/null || echo unknown)"
    echo "version_haproxy=$("$HAPROXY" -v 2>/dev/null | head -1 | awk '{print $3}')"
    echo "version_mariadb=$(mariadbd --version 2>/dev/null | awk '{print $3}')"
    echo "version_galera=$(dpkg-query -W -f '${Version}' galera-4 2>/dev/null || echo unknown)"
    echo "version_sysbench=$(sysbench --version 2>/dev/null | awk '{print $2}')"
}

# The knobs both runs share, key=value lines for env.txt.
balancer_params_env() {
    echo "param_balancer_cpu=$BAL_CPU"
    echo "param_ringpen_workers=$RINGPEN_WORKERS"
    echo "param_ringpen_extra=$RINGPEN_EXTRA"
    echo "param_check_interval_s=$CHECK_INTERVAL"
    echo "param_bucket_ms=$BUCKET_MS"
    echo "param_quiet_max=${QUIET_MAX:-0.15}"
}

# The command line (and HAProxy configuration) of each balancer path in
# "$@", key=value lines for env.txt; WORK is the run's directory.
balancer_cmds_env() {
    local p
    for p in "$@"; do
        case "$p" in direct | direct-all) continue ;; esac
        mkdir -p "$WORK/cmd-$p"
        echo "cmd_$p=$(balancer_cmd "$p" "$WORK/cmd-$p" | tr '\n' ' ')"
        [ ! -f "$WORK/cmd-$p/haproxy.cfg" ] || echo "cmd_${p}_cfg=$(tr '\n' ';' <"$WORK/cmd-$p/haproxy.cfg")"
    done
}

ensure_ringpen() {
    if [ ! -x "$RINGPEN" ]; then
        log "building ringpen (cargo build --release)"
        (cd "$REPO_ROOT" && cargo build --release >&2) || die "cargo build --release failed"
    fi
    local newer
    newer=$(cd "$REPO_ROOT" && find src Cargo.toml Cargo.lock -newer "$RINGPEN" -type f 2>/dev/null | head -1)
    if [ -n "$newer" ]; then
        if [ "${BUILD:-0}" = 1 ]; then
            log "$newer is newer than $RINGPEN: cargo build --release"
            (cd "$REPO_ROOT" && cargo build --release >&2) || die "cargo build --release failed"
        else
            log "warning: $newer is newer than $RINGPEN (BUILD=1 rebuilds first)"
        fi
    fi
}

# Busy share of all CPUs over $1 s (user+nice+system+irq+softirq+steal).
cpu_busy() {
    local a b
    a=$(head -1 /proc/stat)
    sleep "${1:-1}"
    b=$(head -1 /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN{
        split(a, x); split(b, y)
        busy = (y[2]-x[2]) + (y[3]-x[3]) + (y[4]-x[4]) + (y[7]-x[7]) + (y[8]-x[8]) + (y[9]-x[9])
        total = busy + (y[5]-x[5]) + (y[6]-x[6])
        printf "%.3f", (total > 0 ? busy / total : 0) }'
}

# The machine may be shared: waits (at most QUIET_WAIT s, default 60) until
# the CPUs are below QUIET_MAX busy (default 0.15, the idle cluster itself
# included) and prints the last busy share measured.
wait_quiet() {
    local start=$SECONDS busy
    while :; do
        busy=$(cpu_busy 1)
        if awk -v b="$busy" -v m="${QUIET_MAX:-0.15}" 'BEGIN{exit !(b < m)}'; then break; fi
        [ $((SECONDS - start)) -lt "${QUIET_WAIT:-60}" ] || { log "machine still busy (${busy}) after ${QUIET_WAIT:-60}s: measuring anyway"; break; }
    done
    echo "$busy"
}
