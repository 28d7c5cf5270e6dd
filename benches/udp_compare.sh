#!/usr/bin/env bash
# UDP balancing (-U) benchmark: ringpen vs Debian's pen vs no balancer.
#
#   benches/udp_compare.sh            # 5 rounds x 5 s per path, ~2 minutes
#
# Load: CLIENTS client sockets on 127.0.0.10.. (one per address, wrapping
# after 200), each keeping WINDOW small datagrams (SIZE bytes) in flight and
# sending the next one when an echo comes back (closed loop), against a C
# echo backend (recvmmsg/sendmmsg).  benches/udpload.c is compiled on the
# fly into a temporary directory.
#
# Paths measured, in a rotating order each round, each with a freshly
# started balancer:
#   ringpen  target/release/ringpen -f -U --workers 1 -x 10000 LISTEN BACKEND
#   pen      /usr/bin/pen -f -U -x 10000 LISTEN BACKEND
#            (pen -U keeps one pseudo-connection per client address:port in
#            a table of -x slots, hence -x 10000 for both)
#   direct   clients talk to the backend itself
# The balancer runs on CPU 0, load generator and backend on CPU 1.
#
# Reported per path (medians over rounds): round trips per second (one
# round trip = one datagram forwarded each way), the balancer's CPU time per
# round trip (utime+stime of the whole process from /proc/PID/stat over the
# measured window, divided by round trips), all of CPU 0's busy time per
# round trip (/proc/stat: includes ksoftirqd and anything else on CPU 0),
# mean RTT, CPU busy shares, and every datagram that did not come back
# (timeouts) with the kernel's drop counters per socket.  A Markdown table
# goes to stdout, progress to stderr, everything (per round too) to
# benches/results/udp-<date>.json.
#
# The machine may be shared: before each measurement the script waits (up
# to QUIET_WAIT s) for both CPUs to be idle, and a measurement during which
# something else used more than 5% of either CPU (/proc/stat minus the
# benchmark's own processes and ksoftirqd) is marked disturbed and redone
# (up to RETRIES times); medians use the last attempt of each round.
#
# Environment knobs: ROUNDS [5] DURATION [5] WARMUP [1] CLIENTS [64]
# WINDOW [4] SIZE [64] TIMEOUT_MS [500] LPORT [39100] BPORT [39101]
# RETRIES [2] QUIET_WAIT [60] KEEP_TMP [unset: delete logs] RINGPEN [target/release/ringpen] PEN [/usr/bin/pen]
set -euo pipefail

if (($#)); then
    echo "udp_compare.sh takes no arguments; settings are environment variables (see the top of the script)" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
CLIENTS=${CLIENTS:-64}
WINDOW=${WINDOW:-4}
SIZE=${SIZE:-64}
TIMEOUT_MS=${TIMEOUT_MS:-500}
LPORT=${LPORT:-39100}
BPORT=${BPORT:-39101}
RETRIES=${RETRIES:-2}
QUIET_WAIT=${QUIET_WAIT:-60}
RINGPEN=${RINGPEN:-${CARGO_TARGET_DIR:-target}/release/ringpen}
PEN=${PEN:-/usr/bin/pen}
BENCH=udp_compare
# shellcheck source=benches/lib.sh
. benches/lib.sh # BAL_CPU LOAD_CPU die need_* check_ringpen port_free wait_listen wait_quiet started stop_pid stop_all

need_cpus
need_tools taskset gcc python3 ss pgrep
[ -x "$PEN" ] || die "$PEN not found (apt-get install pen)"
check_ringpen "$RINGPEN"
for port in "$LPORT" "$BPORT"; do
    port_free udp "$port" || die "UDP port $port is in use (set LPORT/BPORT)"
done

TMP=$(mktemp -d /tmp/udp_compare.XXXXXX)
gcc -O2 -Wall -o "$TMP/udpload" benches/udpload.c || die "cannot compile benches/udpload.c"

# ksoftirqd of both CPUs: accounted apart (it may carry the benchmark's own
# packet processing, so it does not count as a disturbance).
KSOFT0=$(pgrep -x "ksoftirqd/$BAL_CPU" || echo 0)
KSOFT1=$(pgrep -x "ksoftirqd/$LOAD_CPU" || echo 0)

cleanup() {
    stop_all
    [ -n "${KEEP_TMP:-}" ] || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

taskset -c "$LOAD_CPU" "$TMP/udpload" echo "$BPORT" 127.0.0.1 &
BACKEND_PID=$!
started "$BACKEND_PID"
wait_listen udp "$BPORT" "$BACKEND_PID" || die "echo backend did not start"

# Kernel UDP counters and per-socket drops (/proc/net/udp), as JSON.
snapshot() {
    python3 - "$LPORT" "$BPORT" <<'EOF'
import json, sys
lport, bport = int(sys.argv[1]), int(sys.argv[2])
lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Udp:")]
snmp = dict(zip(lines[0][1:], map(int, lines[1][1:])))
drops = {"listener": 0, "backend": 0, "upstream": 0, "other": 0}
sockets = {"listener": 0, "upstream": 0}
for line in list(open("/proc/net/udp"))[1:]:
    f = line.split()
    local_port = int(f[1].split(":")[1], 16)
    rem_port = int(f[2].split(":")[1], 16)
    kind = ("listener" if local_port == lport else "backend" if local_port == bport
            else "upstream" if rem_port == bport else "other")
    drops[kind] += int(f[-1])
    if kind in sockets:
        sockets[kind] += 1
print(json.dumps({"snmp": snmp, "drops": drops, "sockets": sockets}))
EOF
}

RESULTS=$TMP/rounds.jsonl
: >"$RESULTS"

# One measurement; appends a JSON record; returns 3 if it was disturbed.
run_one() { # kind round attempt
    local kind=$1 round=$2 attempt=$3 target pid='' status=alive exit_code=null cmd=''
    local -a argv=()
    local before after load log=$TMP/$1-$2-$3.log
    before=$(snapshot)
    case $kind in
        ringpen) argv=("$RINGPEN" -f -U --workers 1 -x 10000 "127.0.0.1:$LPORT" "127.0.0.1:$BPORT") ;;
        pen) argv=("$PEN" -f -U -x 10000 "127.0.0.1:$LPORT" "127.0.0.1:$BPORT") ;;
    esac
    cmd="${argv[*]}" # for the results file
    if ((${#argv[@]})); then
        taskset -c "$BAL_CPU" "${argv[@]}" >"$log" 2>&1 &
        pid=$!
        started "$pid"
        wait_listen udp "$LPORT" "$pid" || status=did_not_start
        target=127.0.0.1:$LPORT
    else
        target=127.0.0.1:$BPORT
    fi
    if [ "$status" = alive ]; then
        load=$(timeout $((WARMUP + DURATION + 30)) taskset -c "$LOAD_CPU" "$TMP/udpload" load "$target" \
            -c "$CLIENTS" -w "$WINDOW" -s "$SIZE" -W "$WARMUP" -d "$DURATION" -t "$TIMEOUT_MS" \
            ${pid:+-p "$pid"} -q "$BACKEND_PID" -x "$KSOFT0" -x "$KSOFT1") ||
            load='{"error":"load generator failed or hung"}'
    else
        load='{"error":"balancer did not start"}'
    fi
    after=$(snapshot)
    if [ -n "$pid" ]; then
        stop_pid "$pid"
        exit_code=$STOP_EXIT
        if [ "$STOP_STATUS" = ignored_sigterm ]; then
            status=ignored_sigterm
        elif [ "$STOP_STATUS" = gone ] && [ "$status" = alive ]; then
            status=died_during_load
        fi
    fi
    python3 - "$kind" "$round" "$attempt" "$status" "$exit_code" "$cmd" "$log" \
        "$before" "$after" "$load" "$BAL_CPU" "$LOAD_CPU" "$RESULTS" <<'EOF'
import json, os, sys
kind, rnd, attempt, status, code, cmd, log, before, after, load, c0, c1, results = sys.argv[1:]
before, after, load = json.loads(before), json.loads(after), json.loads(load)
rec = {"path": kind, "round": int(rnd), "attempt": int(attempt), "balancer_cmd": cmd or None,
       "balancer_status": status if cmd else None,
       "balancer_exit": (None if code == "null" else int(code)) if cmd else None}
rec.update(load)
rec["kernel_udp"] = {k: after["snmp"][k] - before["snmp"].get(k, 0)
                     for k in ("InErrors", "RcvbufErrors", "SndbufErrors", "NoPorts", "MemErrors")
                     if k in after["snmp"]}
rec["socket_drops"] = {k: after["drops"][k] - (before["drops"][k] if k == "backend" else 0)
                       for k in ("listener", "upstream", "backend")}
rec["balancer_sockets"] = after["sockets"]
disturbed = False
if "error" not in rec:
    cpus, secs = rec["cpus"], rec["secs"]
    bal = max(rec["balancer_cpu_s"], 0)
    k0, k1 = rec["extra_cpu_s"]
    cpu0, cpu1 = cpus[int(c0)], cpus[int(c1)]
    rec["cpu0_busy"] = cpu0["busy_s"] / secs
    rec["cpu1_busy"] = cpu1["busy_s"] / secs
    rec["ksoftirqd0_s"], rec["ksoftirqd1_s"] = k0, k1
    rec["cpu0_us_per_dgram"] = cpu0["busy_s"] * 1e6 / rec["round_trips"] if kind != "direct" and rec["round_trips"] else None
    # Whatever ran on the two CPUs besides the benchmark (tick accounting: +-0.02 s).
    rec["foreign_cpu0"] = max(0.0, cpu0["busy_s"] - bal - k0) / secs
    rec["foreign_cpu1"] = max(0.0, cpu1["busy_s"] - rec["backend_cpu_s"] - rec["loadgen_cpu_s"] - k1) / secs
    steal = (cpu0["steal_s"] + cpu1["steal_s"]) / secs
    disturbed = max(rec["foreign_cpu0"], rec["foreign_cpu1"], steal) > 0.05
rec["disturbed"] = disturbed
if cmd and os.path.exists(log):
    rec["balancer_log_tail"] = open(log, errors="replace").read()[-600:]
with open(results, "a") as f:
    print(json.dumps(rec), file=f)
head = f"  round {rec['round']} {kind:8s}"
if "error" in rec:
    print(f"{head} ERROR {rec['error']} (balancer {rec['balancer_status']})", file=sys.stderr)
else:
    us = f"{rec['balancer_us_per_dgram']:5.2f} us/rt" if cmd else "    -       "
    print(f"{head} {rec['rate']:>8.0f} rt/s {us}  rtt {rec['mean_rtt_us']:5.0f} us"
          f"  lost {rec['lost']}/{rec['warmup_lost']}/{rec['drain_lost']}  slowest 1s {rec['min_1s']}"
          f"  drops {rec['socket_drops']['listener']}/{rec['socket_drops']['upstream']}/{rec['socket_drops']['backend']}"
          f"  foreign cpu {100 * rec['foreign_cpu0']:.0f}%/{100 * rec['foreign_cpu1']:.0f}%"
          f"{'  DISTURBED' if disturbed else ''}  {rec['balancer_status'] or ''}", file=sys.stderr)
sys.exit(3 if disturbed else 0)
EOF
}

KINDS=(ringpen pen direct)
echo "udp_compare: $ROUNDS rounds x ${DURATION}s (+${WARMUP}s warmup), $CLIENTS clients x $WINDOW outstanding, ${SIZE}-byte datagrams" >&2
echo "  (lost = measured/warmup/drain; drops = kernel drops at listener/upstream/backend sockets)" >&2
for ((r = 0; r < ROUNDS; r++)); do
    for ((k = 0; k < 3; k++)); do
        for ((a = 0; a <= RETRIES; a++)); do
            wait_quiet
            if run_one "${KINDS[$(((r + k) % 3))]}" "$r" "$a"; then break; fi
        done
    done
done

mkdir -p benches/results
OUT=benches/results/udp-$(date +%Y-%m-%dT%H%M%S).json
python3 - "$RESULTS" "$OUT" "$(realpath "$RINGPEN")" <<EOF
import json, os, platform, statistics, subprocess, sys, time
attempts = [json.loads(l) for l in open(sys.argv[1])]
out, ringpen_bin = sys.argv[2], sys.argv[3]
# The last attempt of each (path, round) counts.
last = {}
for r in attempts:
    last[(r["path"], r["round"])] = r
rounds = list(last.values())
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
def run(*a, **kw):
    try:
        return subprocess.run(a, capture_output=True, text=True, **kw).stdout.strip()
    except OSError:
        return None
med = lambda xs: statistics.median(xs) if xs else None
summary = {}
for kind in ("ringpen", "pen", "direct"):
    rs = [r for r in rounds if r["path"] == kind]
    ok = [r for r in rs if "error" not in r]
    bal = kind != "direct"
    s = {
        "rounds": len(rs), "rounds_failed": len(rs) - len(ok),
        "rounds_disturbed": sum(r["disturbed"] for r in rs),
        "attempts": sum(1 for r in attempts if r["path"] == kind),
        "rate_median": med([r["rate"] for r in ok]),
        "rate_all": [round(r["rate"]) for r in ok],
        "balancer_us_per_dgram_median": med([r["balancer_us_per_dgram"] for r in ok]) if bal else None,
        "balancer_us_per_dgram_all": [r["balancer_us_per_dgram"] for r in ok] if bal else None,
        "cpu0_us_per_dgram_median": med([r["cpu0_us_per_dgram"] for r in ok]) if bal else None,
        "mean_rtt_us_median": med([r["mean_rtt_us"] for r in ok]),
        "cpu0_busy_median": med([r["cpu0_busy"] for r in ok]),
        "cpu1_busy_median": med([r["cpu1_busy"] for r in ok]),
        "lost_measured": sum(r["lost"] for r in ok),
        "lost_warmup": sum(r["warmup_lost"] for r in ok),
        "lost_drain": sum(r["drain_lost"] + r["unanswered_at_end"] for r in ok),
        "sent_measured": sum(r["sent"] for r in ok),
        "stale_misrouted_bad": sum(r["stale"] + r["misrouted"] + r["bad"] for r in ok),
        "send_recv_errors": sum(r["send_err"] + r["recv_err"] for r in ok),
        "kernel_rcvbuf_errors": sum(r["kernel_udp"].get("RcvbufErrors", 0) for r in rs),
        "listener_socket_drops": sum(r["socket_drops"]["listener"] for r in rs),
        "upstream_socket_drops": sum(r["socket_drops"]["upstream"] for r in rs),
        "backend_socket_drops": sum(r["socket_drops"]["backend"] for r in rs),
        "min_1s_over_median": (min(r["min_1s"] for r in ok) / med([r["rate"] for r in ok])) if ok else None,
        "balancer_statuses": sorted({r["balancer_status"] for r in rs if r["balancer_status"]}),
    }
    summary[kind] = s
def ratio(a, b):
    return a / b if a is not None and b else None
R, P, D = summary["ringpen"], summary["pen"], summary["direct"]
ratios = {
    "rate_ringpen_over_pen": ratio(R["rate_median"], P["rate_median"]),
    "rate_ringpen_over_direct": ratio(R["rate_median"], D["rate_median"]),
    "rate_pen_over_direct": ratio(P["rate_median"], D["rate_median"]),
    "cpu_per_dgram_ringpen_over_pen": ratio(R["balancer_us_per_dgram_median"], P["balancer_us_per_dgram_median"]),
    "cpu0_per_dgram_ringpen_over_pen": ratio(R["cpu0_us_per_dgram_median"], P["cpu0_us_per_dgram_median"]),
}
machine = {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": cpu}
doc = {
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "machine": machine,
    "ringpen": {"binary": ringpen_bin, "git": run("git", "describe", "--always", "--dirty", cwd="$ROOT"),
                "binary_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.path.getmtime(ringpen_bin)))},
    "pen_version": run("dpkg-query", "-W", "-f", "\${Version}", "pen"),
    "params": {"rounds": $ROUNDS, "duration_s": $DURATION, "warmup_s": $WARMUP, "clients": $CLIENTS,
               "outstanding_per_client": $WINDOW, "datagram_bytes": $SIZE, "timeout_ms": $TIMEOUT_MS,
               "balancer_cpu": $BAL_CPU, "load_and_backend_cpu": $LOAD_CPU, "retries": $RETRIES,
               "unit": "one datagram = one round trip (request forwarded up, echo forwarded down)"},
    "summary": summary, "ratios": ratios, "rounds": rounds, "all_attempts": attempts,
}
os.makedirs(os.path.dirname(out), exist_ok=True)
json.dump(doc, open(out, "w"), indent=1)

f = lambda x, p=0: "—" if x is None else f"{x:,.{p}f}"
pc = lambda x: "—" if x is None else f"{100 * x:.0f}%"
print(f"\nUDP -U: {machine['nproc']} CPUs, {cpu}, Linux {machine['kernel']}; $CLIENTS clients x $WINDOW outstanding, "
      f"${SIZE}-byte datagrams; medians of $ROUNDS x ${DURATION} s; balancer on CPU $BAL_CPU, load + echo backend on CPU $LOAD_CPU\n")
print("| path | datagrams/s (round trips) | balancer CPU µs/datagram | CPU0 µs/datagram | mean RTT µs | CPU0/CPU1 busy | lost: measured/warmup/drain of sent | kernel drops: listener/upstream/backend | disturbed rounds |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for kind, s in summary.items():
    status = "" if s["balancer_statuses"] in ([], ["alive"]) else " ⚠ " + ",".join(s["balancer_statuses"])
    print(f"| {kind}{status} | {f(s['rate_median'])} | {f(s['balancer_us_per_dgram_median'], 2)} | "
          f"{f(s['cpu0_us_per_dgram_median'], 2)} | {f(s['mean_rtt_us_median'])} | "
          f"{pc(s['cpu0_busy_median'])}/{pc(s['cpu1_busy_median'])} | "
          f"{s['lost_measured']}/{s['lost_warmup']}/{s['lost_drain']} of {s['sent_measured']:,} | "
          f"{s['listener_socket_drops']}/{s['upstream_socket_drops']}/{s['backend_socket_drops']} | "
          f"{s['rounds_disturbed']}/{s['rounds']} |")
print()
print(f"ringpen/pen: rate {f(ratios['rate_ringpen_over_pen'], 3)}, balancer CPU per datagram "
      f"{f(ratios['cpu_per_dgram_ringpen_over_pen'], 3)} (CPU0 {f(ratios['cpu0_per_dgram_ringpen_over_pen'], 3)}); "
      f"ringpen/direct: rate {f(ratios['rate_ringpen_over_direct'], 3)}; pen/direct: rate {f(ratios['rate_pen_over_direct'], 3)}")
for kind, s in summary.items():
    if s["rounds_failed"] or s["lost_measured"] or s["lost_drain"] or s["stale_misrouted_bad"] \
       or s["send_recv_errors"] or s["rounds_disturbed"] \
       or (s["min_1s_over_median"] is not None and s["min_1s_over_median"] < 0.5) \
       or s["balancer_statuses"] not in ([], ["alive"]):
        print(f"⚠ {kind}: failed rounds {s['rounds_failed']}, disturbed {s['rounds_disturbed']}, "
              f"lost {s['lost_measured']}+{s['lost_drain']}, stale/misrouted/bad {s['stale_misrouted_bad']}, "
              f"send/recv errors {s['send_recv_errors']}, slowest second {f(s['min_1s_over_median'], 2)} x median, "
              f"balancer {s['balancer_statuses']}")
print(f"\nJSON: {out}")
EOF
