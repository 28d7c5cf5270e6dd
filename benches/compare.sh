#!/usr/bin/env bash
# TCP benchmark: ringpen vs Debian's pen vs haproxy vs nginx (stream) vs no
# balancer, the same load through each, in one invocation.
#
#   benches/compare.sh                     # 5 rounds, ~20 minutes
#   ROUNDS=1 DURATION=3 benches/compare.sh # quick check, ~3 minutes
# (more on a busy machine: waits for quiet CPUs and redone measurements;
# the first full run here, beside other benchmarks, took 30 minutes)
#
# Paths, in an order rotated by one each round, each measurement (path x
# phase) with a freshly started balancer listening on 127.0.0.1:LPORT:
#   ringpen  target/release/ringpen -f -r -x 10000 --workers RINGPEN_WORKERS
#   pen      /usr/bin/pen -f -r -x 10000
#   haproxy  mode tcp, nbthread 2, balance roundrobin, maxconn 9000, no
#            health checks, no logging (haproxy -db)
#   nginx    stream module, 2 worker processes, listen ... reuseport,
#            upstream round robin, daemon off
#   direct   the client talks to the (first) backend itself: the upper limit
# The balancer runs on CPU 0; load generators, backends and clients on CPU 1.
#
# Phases, each a separate measurement:
#   ka      wrk -c CONNS -t1 --latency, keep-alive HTTP, to two nginx http
#           backends (1 worker each, `return 200 "hello\n"`, no access log,
#           keepalive_requests 1e9); a WARMUP s wrk run first, not measured
#   close   the same with -H "Connection: close": one connection per request
#   bulk1   iperf3 -c -t DURATION -P 1 to an iperf3 server as the only
#           backend (its control connection goes through the balancer too)
#   bulk4   the same with -P 4
#   rss     benches/tcphold.py: HOLD idle connections through the balancer to
#           a holder backend (separate client and holder processes); VmRSS
#           summed over the balancer's processes before (idle) and once the
#           holder holds all HOLD (end to end); not for direct
#
# Reported per path (medians over rounds): requests/s with wrk's p50 and p99
# latency, Gbit/s (the receiver's bits_per_second), idle RSS and RSS per
# held connection (Pss too, which does not count the pages nginx's master
# and workers share twice), and the balancer's CPU time (utime+stime from
# /proc/PID/stat, all threads, summed over nginx's master and workers) over
# exactly each measured window: µs per request, s per Gbit.  Ratios: each
# path vs direct, ringpen vs each peer.  A Markdown table goes to stdout,
# progress to stderr, everything (per round too, machine and versions) to
# benches/results/tcp-<date>.json.
#
# The machine may be shared: before each measurement the script waits (up
# to QUIET_WAIT s) for both CPUs to be idle, and a measurement during which
# other processes used more than 5% of a CPU (a scan of /proc), or more than
# 10% of either CPU's busy time is accounted for by no process of the
# benchmark (/proc/stat minus its processes and ksoftirqd: that residue
# also holds kernel work the load itself causes outside any process, up to
# ~7%), is marked disturbed and redone (up to RETRIES times); medians use
# the last attempt of each round (benches/lib.py measure).  A
# balancer that does not start or dies is recorded as such.  Missing Debian
# packages (pen haproxy nginx-light libnginx-mod-stream wrk iperf3) are
# installed with apt-get (INSTALL=0: fail instead).
#
# Environment knobs: ROUNDS [5] DURATION [8] WARMUP [1] CONNS [50]
# HOLD [5000] HOLD_TIMEOUT [60] RINGPEN_WORKERS [1] LPORT [39200]
# B1PORT [39201] B2PORT [39202] IPORT [39203] HPORT [39204] RETRIES [2]
# QUIET_WAIT [60] PATHS [ringpen pen haproxy nginx direct]
# PHASES [ka close bulk1 bulk4 rss] INSTALL [1] RESERVE_PORTS [1: add the
# ports to net.ipv4.ip_local_reserved_ports, see benches/lib.sh] KEEP_TMP [unset: delete
# logs] RINGPEN [target/release/ringpen] PEN [/usr/bin/pen]
# HAPROXY [/usr/sbin/haproxy] NGINX [/usr/sbin/nginx]
# NGINX_STREAM_MODULE [/usr/lib/nginx/modules/ngx_stream_module.so]
set -euo pipefail

if (($#)); then
    echo "compare.sh takes no arguments; settings are environment variables (see the top of the script)" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-1}
CONNS=${CONNS:-50}
HOLD=${HOLD:-5000}
HOLD_TIMEOUT=${HOLD_TIMEOUT:-60}
RINGPEN_WORKERS=${RINGPEN_WORKERS:-1}
LPORT=${LPORT:-39200}
B1PORT=${B1PORT:-39201}
B2PORT=${B2PORT:-39202}
IPORT=${IPORT:-39203}
HPORT=${HPORT:-39204}
RETRIES=${RETRIES:-2}
QUIET_WAIT=${QUIET_WAIT:-60}
INSTALL=${INSTALL:-1}
read -r -a PATHS <<<"${PATHS:-ringpen pen haproxy nginx direct}"
read -r -a PHASES <<<"${PHASES:-ka close bulk1 bulk4 rss}"
RINGPEN=${RINGPEN:-${CARGO_TARGET_DIR:-target}/release/ringpen}
PEN=${PEN:-/usr/bin/pen}
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
NGINX=${NGINX:-/usr/sbin/nginx}
NGINX_STREAM_MODULE=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}
BENCH=compare
# shellcheck source=benches/lib.sh
. benches/lib.sh # BAL_CPU LOAD_CPU die need_* check_ringpen port_free wait_listen wait_quiet started stop_pid stop_all

for p in "${PATHS[@]}"; do
    case $p in ringpen | pen | haproxy | nginx | direct) ;; *) die "unknown path $p in PATHS" ;; esac
done
for p in "${PHASES[@]}"; do
    case $p in ka | close | bulk1 | bulk4 | rss) ;; *) die "unknown phase $p in PHASES" ;; esac
done

# Debian packages for what is missing.
missing=()
[ -x "$PEN" ] || missing+=(pen)
[ -x "$HAPROXY" ] || missing+=(haproxy)
[ -x "$NGINX" ] || missing+=(nginx-light)
[ -f "$NGINX_STREAM_MODULE" ] || missing+=(libnginx-mod-stream)
command -v wrk >/dev/null || missing+=(wrk)
command -v iperf3 >/dev/null || missing+=(iperf3)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$INSTALL" = 1 ] || die "missing: ${missing[*]} (apt-get install them, or INSTALL=1)"
    echo "compare: installing ${missing[*]} (apt-get)..." >&2
    timeout 600 apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
        die "apt-get install ${missing[*]} failed"
fi
need_cpus
need_tools taskset python3 ss pgrep timeout wrk iperf3
for bin in "$PEN" "$HAPROXY" "$NGINX"; do [ -x "$bin" ] || die "$bin not found"; done
[ -f "$NGINX_STREAM_MODULE" ] || die "$NGINX_STREAM_MODULE not found (apt-get install libnginx-mod-stream)"
check_ringpen "$RINGPEN"
for port in "$LPORT" "$B1PORT" "$B2PORT" "$IPORT" "$HPORT"; do
    [ -z "$(ss -Htln "sport = :$port")" ] || die "TCP port $port is in use (set LPORT/B1PORT/B2PORT/IPORT/HPORT)"
done
# HOLD connections take 2 x HOLD descriptors in the balancer.
ulimit -n "$(ulimit -Hn)" || true
nofile=$(ulimit -n)
[ "$nofile" = unlimited ] || [ "$nofile" -ge $((2 * HOLD + 1000)) ] ||
    die "open files limit $nofile is too low for HOLD=$HOLD (needs $((2 * HOLD + 1000)))"

TMP=$(mktemp -d /tmp/tcp_compare.XXXXXX)
KSOFT0=$(pgrep -x "ksoftirqd/$BAL_CPU" || echo 0)
KSOFT1=$(pgrep -x "ksoftirqd/$LOAD_CPU" || echo 0)

cleanup() {
    stop_all
    [ -n "${KEEP_TMP:-}" ] || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Other processes' outgoing connections could take the ports as ephemeral
# ports between two balancer starts; from now on they cannot.
reserve_ports "$LPORT" "$B1PORT" "$B2PORT" "$IPORT" "$HPORT"
hold_ports "$TMP" "$LPORT" "$B1PORT" "$B2PORT" "$IPORT" "$HPORT" ||
    die "TCP ports $LPORT $B1PORT $B2PORT $IPORT $HPORT: not all free (set LPORT/B1PORT/B2PORT/IPORT/HPORT)"

# ---------------------------------------------------------------- backends

# nginx http backend N (1 or 2) on port PORT, pinned to LOAD_CPU.
HTTP_PID=("" "" "")
http_backend_conf() { # dir port
    cat <<EOF
daemon off;
user root;
worker_processes 1;
worker_rlimit_nofile 20000;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000000;
    keepalive_timeout 3600s;
    server {
        listen 127.0.0.1:$2 backlog=4096;
        location / { return 200 "hello\n"; }
    }
}
EOF
}
# (Re)starts whichever http backend is not running.
ensure_http_backends() {
    local n port dir i
    for n in 1 2; do
        if [ -n "${HTTP_PID[$n]}" ] && kill -0 "${HTTP_PID[$n]}" 2>/dev/null; then continue; fi
        if [ -n "${HTTP_PID[$n]}" ]; then
            echo "  (http backend $n died; restarting it)" >&2
            stop_pid "${HTTP_PID[$n]}"
        fi
        port=$B1PORT
        [ "$n" = 1 ] || port=$B2PORT
        dir=$TMP/http$n
        mkdir -p "$dir"
        http_backend_conf "$dir" "$port" >"$dir/nginx.conf"
        taskset -c "$LOAD_CPU" "$NGINX" -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/out.log" 2>&1 &
        HTTP_PID[n]=$!
        started "${HTTP_PID[$n]}"
        wait_listen tcp "$port" "${HTTP_PID[$n]}" || die "http backend $n did not start: $(tail -3 "$dir/error.log" "$dir/out.log" 2>/dev/null)"
        for ((i = 0; i < 100; i++)); do
            [ -z "$(pgrep -P "${HTTP_PID[$n]}")" ] || break
            sleep 0.05
        done
    done
}
# Both backends' processes (master and worker), one per line.
http_backend_pids() {
    local n
    for n in 1 2; do
        echo "${HTTP_PID[$n]}"
        descendants "${HTTP_PID[$n]}"
    done
}

# ---------------------------------------------------------------- balancers

haproxy_conf() { # backend ports...
    local p
    cat <<EOF
global
    nbthread 2
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    maxconn 9000
frontend fe
    bind 127.0.0.1:$LPORT
    default_backend be
backend be
    balance roundrobin
EOF
    for p; do echo "    server s$p 127.0.0.1:$p"; done
}

nginx_stream_conf() { # dir backend ports...
    local dir=$1 p
    shift
    cat <<EOF
load_module $NGINX_STREAM_MODULE;
daemon off;
user root;
worker_processes 2;
worker_rlimit_nofile 20000;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 16000; }
stream {
    upstream be {
EOF
    for p; do echo "        server 127.0.0.1:$p;"; done
    cat <<EOF
    }
    server {
        listen 127.0.0.1:$LPORT reuseport;
        proxy_pass be;
    }
}
EOF
}

# start_balancer KIND TAG BACKEND_PORT...: starts it pinned to BAL_CPU;
# sets BAL_PID, BAL_PIDS (its processes: nginx's master and workers),
# BAL_STATUS (alive or did_not_start), BAL_CMD and BAL_LOG.
start_balancer() {
    local kind=$1 tag=$2 dir p i backends=()
    shift 2
    for p; do backends+=("127.0.0.1:$p"); done
    BAL_LOG=$TMP/$tag.log
    case $kind in
        ringpen) BAL_CMD=("$RINGPEN" -f -r -x 10000 --workers "$RINGPEN_WORKERS" "127.0.0.1:$LPORT" "${backends[@]}") ;;
        pen) BAL_CMD=("$PEN" -f -r -x 10000 "127.0.0.1:$LPORT" "${backends[@]}") ;;
        haproxy)
            haproxy_conf "$@" >"$TMP/$tag.haproxy.cfg"
            BAL_CMD=("$HAPROXY" -db -f "$TMP/$tag.haproxy.cfg")
            ;;
        nginx)
            dir=$TMP/$tag.nginx
            mkdir -p "$dir"
            nginx_stream_conf "$dir" "$@" >"$dir/nginx.conf"
            BAL_CMD=("$NGINX" -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log")
            BAL_LOG=$dir/error.log
            ;;
    esac
    # A port another process got as its ephemeral port frees up soon.
    wait_port_free tcp "$LPORT" 10 || echo "  (port $LPORT is in use: $(ss -Htanp "sport = :$LPORT" | head -2))" >&2
    taskset -c "$BAL_CPU" "${BAL_CMD[@]}" >>"$TMP/$tag.out" 2>&1 &
    BAL_PID=$!
    started "$BAL_PID"
    BAL_STATUS=alive
    wait_listen tcp "$LPORT" "$BAL_PID" || BAL_STATUS=did_not_start
    if [ "$kind" = nginx ] && [ "$BAL_STATUS" = alive ]; then
        for ((i = 0; i < 100; i++)); do
            [ "$(pgrep -c -P "$BAL_PID")" -lt 2 ] || break
            sleep 0.05
        done
        [ "$(pgrep -c -P "$BAL_PID")" -ge 2 ] || BAL_STATUS=did_not_start
    fi
    BAL_PIDS=("$BAL_PID")
    for p in $(descendants "$BAL_PID"); do BAL_PIDS+=("$p"); done
}

# ---------------------------------------------------------------- one measurement

RESULTS=$TMP/rounds.jsonl
: >"$RESULTS"

# run_one PATH PHASE ROUND ATTEMPT: one measurement; appends a JSON record
# to RESULTS; returns 3 if it was disturbed.
run_one() {
    local kind=$1 phase=$2 round=$3 attempt=$4
    local tag=$1-$2-$3-$4 out target aux_pid='' backends=() hdr=() mopts=() pid status=none exit_code=null
    local cmd_str='' log='' streams
    out=$TMP/$tag.json
    case $phase in
        ka | close)
            ensure_http_backends
            backends=("$B1PORT" "$B2PORT")
            ;;
        bulk1 | bulk4)
            wait_port_free tcp "$IPORT" 10 || true
            # Not -1 (one-off): a server that has exited by the end of the
            # window would leave its CPU time out of the accounting.
            taskset -c "$LOAD_CPU" iperf3 -s -B 127.0.0.1 -p "$IPORT" >"$TMP/$tag.iperf3s.log" 2>&1 &
            aux_pid=$!
            started "$aux_pid"
            wait_listen tcp "$IPORT" "$aux_pid" || echo "  (iperf3 server did not start)" >&2
            backends=("$IPORT")
            ;;
        rss)
            wait_port_free tcp "$HPORT" 10 || true
            rm -f "$TMP/held"
            taskset -c "$LOAD_CPU" python3 benches/tcphold.py hold "$HPORT" "$TMP/held" >"$TMP/$tag.holder.log" 2>&1 &
            aux_pid=$!
            started "$aux_pid"
            wait_listen tcp "$HPORT" "$aux_pid" || echo "  (holder did not start)" >&2
            backends=("$HPORT")
            ;;
    esac
    BAL_PIDS=()
    if [ "$kind" = direct ]; then
        target=127.0.0.1:${backends[0]}
    else
        start_balancer "$kind" "$tag" "${backends[@]}"
        status=$BAL_STATUS
        cmd_str=${BAL_CMD[*]}
        log=$BAL_LOG
        target=127.0.0.1:$LPORT
    fi
    mopts=(--out "$out" --cpu0 "$BAL_CPU" --cpu1 "$LOAD_CPU" --ksoft0 "$KSOFT0" --ksoft1 "$KSOFT1"
        --timeout $((DURATION + 30)))
    for pid in "${BAL_PIDS[@]}"; do mopts+=(--bal "$pid"); done
    for pid in $(http_backend_pids) $aux_pid; do mopts+=(--ours "$pid"); done
    echo '{"error": "not run: balancer did not start"}' >"$out"
    if [ "$status" = none ] || [ "$status" = alive ]; then
        case $phase in
            ka | close)
                [ "$phase" = ka ] || hdr=(-H "Connection: close")
                if [ "$WARMUP" != 0 ]; then
                    run_tracked timeout $((WARMUP + 20)) taskset -c "$LOAD_CPU" \
                        wrk -c "$CONNS" -t1 -d "${WARMUP}s" "${hdr[@]}" "http://$target/" >/dev/null 2>&1 || true
                fi
                run_tracked taskset -c "$LOAD_CPU" python3 "$BENCH_LIB_PY" measure "${mopts[@]}" -- \
                    wrk -c "$CONNS" -t1 -d "${DURATION}s" --timeout 5s --latency "${hdr[@]}" "http://$target/" ||
                    echo '{"error": "measure failed"}' >"$out"
                ;;
            bulk1 | bulk4)
                streams=${phase#bulk}
                run_tracked taskset -c "$LOAD_CPU" python3 "$BENCH_LIB_PY" measure "${mopts[@]}" -- \
                    iperf3 -c "${target%:*}" -p "${target##*:}" -t "$DURATION" -P "$streams" -J ||
                    echo '{"error": "measure failed"}' >"$out"
                ;;
            rss)
                run_tracked timeout $((HOLD_TIMEOUT + 40)) taskset -c "$LOAD_CPU" python3 benches/tcphold.py rss \
                    "$target" "$HOLD" "$TMP/held" "$HOLD_TIMEOUT" "${BAL_PIDS[@]}" >"$out" ||
                    echo '{"error": "tcphold.py rss failed or hung"}' >"$out"
                ;;
        esac
    fi
    if [ "$kind" != direct ]; then
        stop_pid "$BAL_PID"
        exit_code=$STOP_EXIT
        if [ "$STOP_STATUS" = ignored_sigterm ]; then
            status=ignored_sigterm
        elif [ "$STOP_STATUS" = gone ] && [ "$status" = alive ]; then
            status=died_during_load
        fi
    fi
    [ -z "$aux_pid" ] || stop_pid "$aux_pid"
    python3 - "$kind" "$phase" "$round" "$attempt" "$status" "$exit_code" "$cmd_str" "$log" \
        "$TMP/$tag.out" "$out" "$RESULTS" <<'EOF'
import json, os, re, sys
kind, phase, rnd, attempt, status, code, cmd, log, out_log, out, results = sys.argv[1:]
rec = {"path": kind, "phase": phase, "round": int(rnd), "attempt": int(attempt),
       "balancer_cmd": cmd or None, "balancer_status": None if status == "none" else status,
       "balancer_exit": None if code == "null" else int(code)}
try:
    m = json.load(open(out))
except (OSError, ValueError) as e:
    m = {"error": f"no result: {e}"}
UNIT = {"us": 1, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
def us(s):
    x = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", s)
    return float(x[1]) * UNIT[x[2]] if x else None
if "error" in m:
    rec["error"] = m["error"]
elif phase == "rss":
    rec.update(m)
    if not m.get("complete"):
        rec["error"] = (f"held {m.get('backend_held')}/{m.get('connections')} at the backend, "
                        f"client connected {m.get('client_connected')}, failed {m.get('client_failed')}")
else:
    meas = {k: v for k, v in m.items() if k not in ("stdout", "cmd")}
    rec.update(meas)
    rec["load_cmd"] = " ".join(m["cmd"])
    text, bal = m["stdout"], m["balancer_cpu_s"]
    if m["timed_out"]:
        rec["error"] = "load generator timed out"
    elif phase in ("ka", "close"):
        rec["wrk_output"] = text
        lat = {p: us(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", text, re.M)}
        rq = re.search(r"(\d+) requests in ([\d.]+\w+),", text)
        rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
        avg = re.search(r"^\s+Latency\s+(\S+)", text, re.M)
        se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
        n2 = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        rec["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, se.groups()))) if se \
            else {"connect": 0, "read": 0, "write": 0, "timeout": 0}
        rec["non_2xx"] = int(n2[1]) if n2 else 0
        if m["rc"] != 0 or not rq or not rps or int(rq[1]) == 0:
            rec["error"] = f"wrk failed (exit {m['rc']}): {(text + m['stderr_tail'])[-300:]!r}"
        else:
            rec["requests"] = int(rq[1])
            rec["wrk_duration_us"] = us(rq[2])
            rec["rps"] = float(rps[1])
            rec["avg_us"] = us(avg[1]) if avg else None
            for p in ("50", "75", "90", "99"):
                rec[f"p{p}_us"] = lat.get(p)
            rec["cpu_us_per_req"] = bal * 1e6 / rec["requests"] if bal is not None else None
    else:
        try:
            j = json.loads(text)
        except ValueError:
            j = {"error": f"iperf3 printed no JSON (exit {m['rc']}): {(text + m['stderr_tail'])[-300:]!r}"}
        if "error" in j:
            rec["error"] = f"iperf3: {j['error']}"
        else:
            r, s = j["end"]["sum_received"], j["end"]["sum_sent"]
            rec.update({"bytes": r["bytes"], "iperf3_seconds": r["seconds"],
                        "gbps": r["bits_per_second"] / 1e9, "retransmits": s.get("retransmits"),
                        "streams": len(j["end"].get("streams", []))})
            gbit = r["bytes"] * 8 / 1e9
            rec["cpu_s_per_gbit"] = bal / gbit if bal is not None and gbit else None
if rec["balancer_status"] in ("did_not_start", "died_during_load"):
    rec["error"] = f"balancer {rec['balancer_status']}" + (f" ({rec['error']})" if "error" in rec else "")
if cmd:
    for name in (log, out_log):
        if name and os.path.exists(name) and os.path.getsize(name):
            rec.setdefault("balancer_log_tail", {})[os.path.basename(name)] = open(name, errors="replace").read()[-600:]
disturbed = bool(rec.get("disturbed")) and "error" not in rec
rec["disturbed"] = disturbed
with open(results, "a") as f:
    print(json.dumps(rec), file=f)
head = f"  round {rec['round']} {kind:8s}{phase:6s}"
lo = rec.get("kernel_tcp", {}).get("TcpExt:ListenOverflows", 0)
tail = (f"  listen overflows {lo}" if lo else "") + \
    (f"  foreign cpu {100 * rec['foreign_cpu0']:.0f}%/{100 * rec['foreign_cpu1']:.0f}%"
     f" others {100 * rec['other_processes_share']:.0f}%" if "foreign_cpu0" in rec else "") + ("  DISTURBED" if disturbed else "")
if "error" in rec:
    print(f"{head} ERROR {rec['error']} (balancer {rec['balancer_status']})", file=sys.stderr)
elif phase in ("ka", "close"):
    cpu = f"{rec['cpu_us_per_req']:6.2f} µs/req" if rec["cpu_us_per_req"] is not None else "     -       "
    errs = sum(rec["socket_errors"].values()) + rec["non_2xx"]
    print(f"{head} {rec['rps']:>9,.0f} req/s  p50 {rec['p50_us']:>7,.0f} µs  p99 {rec['p99_us']:>7,.0f} µs"
          f"  {cpu}{f'  errors {errs}' if errs else ''}{tail}", file=sys.stderr)
elif phase == "rss":
    print(f"{head} idle {rec['idle_rss_kib']:,} KiB  held {rec['held_rss_kib']:,} KiB"
          f"  {rec['per_conn_rss_kib']:.2f} KiB/conn (Pss {rec['per_conn_pss_kib']:.2f})"
          f"  {rec['connections']} held in {rec['connect_s']:.1f} s{tail}", file=sys.stderr)
else:
    cpu = f"{rec['cpu_s_per_gbit']:6.3f} s/Gbit" if rec["cpu_s_per_gbit"] is not None else "     -      "
    print(f"{head} {rec['gbps']:7.2f} Gbit/s  {cpu}  retransmits {rec['retransmits']}{tail}", file=sys.stderr)
sys.exit(3 if disturbed else 0)
EOF
}

# ---------------------------------------------------------------- rounds

ensure_http_backends
npaths=${#PATHS[@]}
per_round=$(((2 * (WARMUP + DURATION) + 2 * DURATION + 10) * npaths))
echo "compare: $ROUNDS rounds of ${PATHS[*]} x ${PHASES[*]}; ${DURATION}s per measurement (+${WARMUP}s wrk warmup);" \
    "wrk -c$CONNS -t1; $HOLD held connections; roughly $((ROUNDS * per_round / 60 + 1)) minutes" >&2
for ((r = 0; r < ROUNDS; r++)); do
    for ((k = 0; k < npaths; k++)); do
        kind=${PATHS[$(((r + k) % npaths))]}
        for phase in "${PHASES[@]}"; do
            [ "$kind:$phase" != direct:rss ] || continue
            for ((a = 0; a <= RETRIES; a++)); do
                wait_quiet
                if run_one "$kind" "$phase" "$r" "$a"; then break; fi
            done
        done
    done
done

# ---------------------------------------------------------------- summary

mkdir -p benches/results
OUT=benches/results/tcp-$(date +%Y-%m-%dT%H%M%S).json
# Configurations as used (the last round's), for the record.
cfg_haproxy=$(haproxy_conf "$B1PORT" "$B2PORT")
cfg_nginx=$(nginx_stream_conf "\$TMP/nginx" "$B1PORT" "$B2PORT")
cfg_http=$(http_backend_conf "\$TMP/http1" "$B1PORT")
python3 - "$RESULTS" "$OUT" "$(realpath "$RINGPEN")" "$cfg_haproxy" "$cfg_nginx" "$cfg_http" <<EOF
import json, os, sys, time
sys.path.insert(0, "benches")
from lib import median, ratio, machine, pkg_version, run
results, out, ringpen_bin, cfg_haproxy, cfg_nginx, cfg_http = sys.argv[1:]
attempts = [json.loads(l) for l in open(results)]
last = {}
for r in attempts:
    last[(r["path"], r["phase"], r["round"])] = r
rounds = list(last.values())
PATHS = "${PATHS[*]}".split()
PEERS = [p for p in ("pen", "haproxy", "nginx") if p in PATHS]
# key, phase, field, label, better (up/down), decimals
METRICS = [
    ("ka_rps", "ka", "rps", "keep-alive requests/s", "↑", 0),
    ("ka_p50_us", "ka", "p50_us", "keep-alive p50 latency µs", "↓", 0),
    ("ka_p99_us", "ka", "p99_us", "keep-alive p99 latency µs", "↓", 0),
    ("ka_cpu_us_per_req", "ka", "cpu_us_per_req", "keep-alive balancer CPU µs/request", "↓", 2),
    ("close_rps", "close", "rps", "new-connection requests/s", "↑", 0),
    ("close_p50_us", "close", "p50_us", "new-connection p50 latency µs", "↓", 0),
    ("close_p99_us", "close", "p99_us", "new-connection p99 latency µs", "↓", 0),
    ("close_cpu_us_per_req", "close", "cpu_us_per_req", "new-connection balancer CPU µs/request", "↓", 2),
    ("bulk1_gbps", "bulk1", "gbps", "bulk 1 stream Gbit/s", "↑", 2),
    ("bulk1_cpu_s_per_gbit", "bulk1", "cpu_s_per_gbit", "bulk 1 stream balancer CPU s/Gbit", "↓", 3),
    ("bulk4_gbps", "bulk4", "gbps", "bulk 4 streams Gbit/s", "↑", 2),
    ("bulk4_cpu_s_per_gbit", "bulk4", "cpu_s_per_gbit", "bulk 4 streams balancer CPU s/Gbit", "↓", 3),
    ("idle_rss_kib", "rss", "idle_rss_kib", "idle RSS KiB", "↓", 0),
    ("rss_per_conn_kib", "rss", "per_conn_rss_kib", "RSS per held connection KiB", "↓", 2),
    ("idle_pss_kib", "rss", "idle_pss_kib", "idle Pss KiB", "↓", 0),
    ("pss_per_conn_kib", "rss", "per_conn_pss_kib", "Pss per held connection KiB", "↓", 2),
    ("rss_connect_s", "rss", "connect_s", "s to get all connections held", "↓", 2),
]
summary = {}
for kind in PATHS:
    s = {"phases": {}}
    for phase in "${PHASES[*]}".split():
        rs = [r for r in rounds if r["path"] == kind and r["phase"] == phase]
        if not rs:
            continue
        ok = [r for r in rs if "error" not in r]
        s["phases"][phase] = {
            "rounds": len(rs), "failed": len(rs) - len(ok), "disturbed": sum(r["disturbed"] for r in rs),
            "attempts": sum(1 for r in attempts if r["path"] == kind and r["phase"] == phase),
            "errors": sorted({r["error"] for r in rs if "error" in r}),
            "balancer_statuses": sorted({r["balancer_status"] for r in rs if r["balancer_status"]}),
            "socket_errors": sum(sum(r.get("socket_errors", {}).values()) for r in ok),
            "non_2xx": sum(r.get("non_2xx", 0) for r in ok),
            "retransmits": sum(r.get("retransmits") or 0 for r in ok),
            "listen_overflows": sum(r.get("kernel_tcp", {}).get("TcpExt:ListenOverflows", 0) for r in rs),
            "cpu0_busy_median": median([r.get("cpu0_busy") for r in ok]),
            "cpu1_busy_median": median([r.get("cpu1_busy") for r in ok]),
        }
    for key, phase, field, *_ in METRICS:
        vals = [r.get(field) for r in rounds if r["path"] == kind and r["phase"] == phase and "error" not in r]
        vals = [v for v in vals if v is not None]
        s[key] = median(vals)
        s[key + "_all"] = vals
    summary[kind] = s
ratios = {"vs_direct": {}, "ringpen_vs": {}}
if "direct" in summary:
    for kind in PATHS:
        if kind != "direct":
            ratios["vs_direct"][kind] = {k: ratio(summary[kind][k], summary["direct"][k]) for k, *_ in METRICS}
if "ringpen" in summary:
    for peer in PEERS:
        ratios["ringpen_vs"][peer] = {k: ratio(summary["ringpen"][k], summary[peer][k]) for k, *_ in METRICS}
first = lambda s: s.splitlines()[0] if s else None
versions = {
    "ringpen": {"binary": ringpen_bin, "version": run(ringpen_bin, "--version"),
                "git": run("git", "describe", "--always", "--dirty", cwd="$ROOT"),
                "binary_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.path.getmtime(ringpen_bin)))},
    "pen": pkg_version("pen"), "haproxy": first(run("$HAPROXY", "-v")), "nginx": run("$NGINX", "-v"),
    "libnginx-mod-stream": pkg_version("libnginx-mod-stream"), "wrk": pkg_version("wrk"),
    "iperf3": first(run("iperf3", "--version")), "python": sys.version.split()[0],
}
mach = machine()
doc = {
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": $SECONDS, "machine": mach, "versions": versions,
    "params": {"rounds": $ROUNDS, "duration_s": $DURATION, "wrk_warmup_s": $WARMUP, "wrk_connections": $CONNS,
               "wrk_threads": 1, "held_connections": $HOLD, "ringpen_workers": $RINGPEN_WORKERS,
               "paths": PATHS, "phases": "${PHASES[*]}".split(), "balancer_cpu": $BAL_CPU,
               "load_and_backend_cpu": $LOAD_CPU, "retries": $RETRIES,
               "ports": {"listen": $LPORT, "http1": $B1PORT, "http2": $B2PORT, "iperf3": $IPORT, "holder": $HPORT},
               "balancer_cpu_unit": "utime+stime of /proc/PID/stat (all threads), summed over the balancer's processes, over the measured window",
               "rss_unit": "VmRSS (and Pss) in KiB summed over the balancer's processes"},
    "configs": {"haproxy": cfg_haproxy, "nginx_stream": cfg_nginx, "nginx_http_backend": cfg_http},
    "metrics": [{"key": k, "phase": p, "label": l, "better": "higher" if b == "↑" else "lower"}
                for k, p, _, l, b, _ in METRICS],
    "summary": summary, "ratios": ratios, "rounds": rounds, "all_attempts": attempts,
}
json.dump(doc, open(out, "w"), indent=1)

f = lambda x, p=0: "—" if x is None else f"{x:,.{p}f}"
phases = set("${PHASES[*]}".split())
shown = [m for m in METRICS if m[1] in phases]
print(f"\nTCP: {mach['nproc']} CPUs, {mach['cpu']}, Linux {mach['kernel']}; medians of $ROUNDS rounds; "
      f"wrk -c$CONNS -t1 ${DURATION} s to 2 nginx backends; iperf3 ${DURATION} s; $HOLD held connections; "
      f"balancer on CPU $BAL_CPU, everything else on CPU $LOAD_CPU; ringpen --workers $RINGPEN_WORKERS, "
      f"haproxy nbthread 2, nginx 2 workers\n")
print("| metric | better | " + " | ".join(PATHS) + " |")
print("|---|:-:|" + "---:|" * len(PATHS))
for key, phase, field, label, better, dec in shown:
    print(f"| {label} | {better} | " + " | ".join(f(summary[k][key], dec) for k in PATHS) + " |")
print("| failed / disturbed measurements | | " + " | ".join(
    f"{sum(p['failed'] for p in summary[k]['phases'].values())} / "
    f"{sum(p['disturbed'] for p in summary[k]['phases'].values())}" for k in PATHS) + " |")
if ratios["vs_direct"]:
    bals = list(ratios["vs_direct"])
    print("\nEach path vs direct (path ÷ direct; throughput: higher is better, latency: lower is better)\n")
    print("| metric | " + " | ".join(bals) + " |")
    print("|---|" + "---:|" * len(bals))
    for key, phase, field, label, better, dec in shown:
        if summary["direct"][key] is None:
            continue
        print(f"| {label} | " + " | ".join(f(ratios["vs_direct"][b][key], 3) for b in bals) + " |")
if ratios["ringpen_vs"]:
    print("\nringpen vs each peer (ringpen ÷ peer; ↑ metrics: above 1 = ringpen better; "
          "↓ metrics — latency, CPU, memory: lower is better, below 1 = ringpen better)\n")
    print("| metric | better | " + " | ".join(f"ringpen/{p}" for p in PEERS) + " |")
    print("|---|:-:|" + "---:|" * len(PEERS))
    for key, phase, field, label, better, dec in shown:
        print(f"| {label} | {better} | " + " | ".join(f(ratios["ringpen_vs"][p][key], 3) for p in PEERS) + " |")
print()
for kind, s in summary.items():
    for phase, p in s["phases"].items():
        if p["failed"] or p["disturbed"] or p["socket_errors"] or p["non_2xx"] \
           or p["balancer_statuses"] not in ([], ["alive"]):
            print(f"⚠ {kind} {phase}: failed {p['failed']}/{p['rounds']}, disturbed {p['disturbed']}, "
                  f"wrk socket errors {p['socket_errors']}, non-2xx {p['non_2xx']}, balancer {p['balancer_statuses']}"
                  + (f", errors: {'; '.join(p['errors'])}" if p["errors"] else ""))
print(f"\nJSON: {out}")
EOF
