#!/usr/bin/env python3
"""Turns the raw files of bench.sh / failover.sh into JSON and Markdown.

    report.py bench    WORKDIR OUT_JSON   (Markdown table on stdout)
    report.py failover WORKDIR OUT_JSON

WORKDIR holds env.txt (key=value, the run's parameters and versions) and
runs/*/ with meta.txt (key=value), sysbench.out and, for the
connection-per-transaction workload, progress/thread-N.log (written by
conn_per_trx.lua; format described there).
"""
import glob
import json
import os
import re
import statistics
import sys
from collections import Counter, defaultdict


def kv(path):
    out = {}
    try:
        with open(path) as f:
            for line in f:
                line = line.rstrip("\n")
                if "=" in line:
                    k, v = line.split("=", 1)
                    out[k] = v
    except FileNotFoundError:
        pass
    return out


def num(v, default=None):
    try:
        f = float(v)
        return int(f) if f.is_integer() and "." not in str(v) else f
    except (TypeError, ValueError):
        return default


def parse_sysbench(path):
    """The last report of a sysbench run (after the warm-up checkpoint)."""
    res = {}
    try:
        text = open(path, errors="replace").read()
    except FileNotFoundError:
        return res
    m = re.findall(r"transactions:\s+(\d+)\s+\(([\d.]+) per sec\.\)", text)
    if m:
        res["transactions"] = int(m[-1][0])
        res["tps"] = float(m[-1][1])
    m = re.findall(r"ignored errors:\s+(\d+)", text)
    if m:
        res["ignored_errors"] = int(m[-1])
    m = re.findall(r"95th percentile:\s+([\d.]+)", text)
    if m:
        res["p95_ms"] = float(m[-1])
    m = re.findall(r"total time:\s+([\d.]+)s", text)
    if m:
        res["total_time_s"] = float(m[-1])
    errs = Counter(re.findall(r"FATAL: (error \d+: [^\n]*)", text))
    if errs:
        res["fatal_errors"] = dict(errs.most_common(10))
    return res


def parse_progress(run_dir, bucket_ms):
    """Merged per-thread progress of conn_per_trx.lua."""
    ok = Counter()
    fail = defaultdict(Counter)  # kind -> bucket -> n
    msgs = Counter()
    last_ok_per_thread = {}
    last_alive_per_thread = {}
    for f in sorted(glob.glob(os.path.join(run_dir, "progress", "thread-*.log"))):
        tid = os.path.basename(f)
        last_ok = None
        last_alive = None
        with open(f, errors="replace") as fh:
            for line in fh:
                line = line.rstrip("\n")
                if line.startswith("S "):
                    _, b, n = line.split(" ")
                    b = int(b)
                    ok[b] += int(n)
                    last_ok = b if last_ok is None else max(last_ok, b)
                elif line.startswith("F "):
                    _, b, kind, n = line.split(" ")
                    fail[kind][int(b)] += int(n)
                elif line.startswith("M "):
                    body, n = line[2:].rsplit(" ", 1)
                    msgs[body.replace("\t", ": ", 1)] += int(n)
                elif line.startswith("L "):
                    last_alive = int(line.split(" ")[1])
        last_ok_per_thread[tid] = last_ok
        last_alive_per_thread[tid] = last_alive
    return {
        "ok": ok,
        "fail": fail,
        "msgs": msgs,
        "last_ok": last_ok_per_thread,
        "last_alive": last_alive_per_thread,
        "bucket_ms": bucket_ms,
    }


def failures(prog, kind, lo=None, hi=None):
    return sum(n for b, n in prog["fail"].get(kind, {}).items()
               if (lo is None or b >= lo) and (hi is None or b < hi))


def longest_stall(ok_buckets, start_b, end_b):
    """Longest run of buckets without a commit within [start_b, end_b]:
    (length in buckets, first empty bucket, whether it reaches end_b)."""
    times = sorted(b for b in ok_buckets if start_b <= b <= end_b)
    if not times:
        return end_b - start_b, start_b, True
    best = (0, start_b, False)
    prev = times[0]
    for b in times[1:]:
        gap = b - prev - 1
        if gap > best[0]:
            best = (gap, prev + 1, False)
        prev = b
    tail = end_b - prev
    if tail > best[0]:
        best = (tail, prev + 1, True)
    return best


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def machine():
    info = {"nproc": os.cpu_count()}
    try:
        info["kernel"] = os.uname().release
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 1048576, 1)
    except OSError:
        pass
    return info



def write_doc(out_json, kind, env, versions, params, commands, **rest):
    """Writes one results file: what ran, where, with which versions, then `rest`."""
    doc = {
        "date": env.get("date"),
        "kind": kind,
        "machine": machine(),
        "versions": versions,
        "params": params,
        "commands": commands,
        **rest,
    }
    with open(out_json, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def read_env(workdir):
    """A run's env.txt: the raw pairs, then its version_, param_ and cmd_ sections."""
    env = kv(os.path.join(workdir, "env.txt"))
    versions = {k[len("version_"):]: v for k, v in env.items() if k.startswith("version_")}
    params = {k[len("param_"):]: num(v, v) for k, v in env.items() if k.startswith("param_")}
    commands = {k[len("cmd_"):]: v for k, v in env.items() if k.startswith("cmd_")}
    return env, versions, params, commands


def read_runs(workdir):
    """Each measured run: its directory and its meta.txt, numbers parsed."""
    for d in sorted(glob.glob(os.path.join(workdir, "runs", "*"))):
        meta = kv(os.path.join(d, "meta.txt"))
        if meta:
            yield d, {k: num(v, v) for k, v in meta.items()}


def fmt(x, spec=",.0f", none="–"):
    return none if x is None else format(x, spec)


# ---------------------------------------------------------------- bench

def bench(workdir, out_json):
    env, versions, params, commands = read_env(workdir)
    bucket_ms = int(params.get("bucket_ms", 10))
    runs = []
    for d, r in read_runs(workdir):
        r.update(parse_sysbench(os.path.join(d, "sysbench.out")))
        if os.path.isdir(os.path.join(d, "progress")):
            prog = parse_progress(d, bucket_ms)
            r["committed"] = sum(prog["ok"].values())
            r["failed_connects"] = failures(prog, "connect")
            r["failed_trx"] = failures(prog, "trx")
            if prog["msgs"]:
                r["failure_messages"] = dict(prog["msgs"].most_common(10))
        wall = (r.get("end_ms", 0) - r.get("start_ms", 0)) / 1000
        if r.get("bal_ticks") is not None and wall > 0:
            r["balancer_cpu_pct"] = round(100 * r["bal_ticks"] / int(env.get("clk_tck", 100)) / wall, 1)
        shares = [r.get(f"node{n}_questions", 0) for n in (1, 2, 3)]
        if sum(shares) > 0:
            r["node_query_share_pct"] = [round(100 * s / sum(shares), 1) for s in shares]
        runs.append(r)

    runs.sort(key=lambda r: r.get("start_ms", 0))
    workloads = [w for w in params.get("workloads", "").split() if w] or sorted({r["workload"] for r in runs})
    paths = [p for p in params.get("paths", "").split() if p] or sorted({r["path"] for r in runs})
    summary = {}
    for w in workloads:
        summary[w] = {}
        for p in paths:
            rs = [r for r in runs if r.get("workload") == w and r.get("path") == p]
            if not rs:
                continue
            good = [r for r in rs if r.get("tps") is not None and r.get("sysbench_rc") == 0]
            s = {
                "rounds": len(rs),
                "rounds_failed": len(rs) - len(good),
                "tps_median": median([r["tps"] for r in good]),
                "tps_all": [r.get("tps") for r in rs],
                "p95_ms_median": median([r.get("p95_ms") for r in good]),
                "p95_ms_all": [r.get("p95_ms") for r in rs],
                "balancer_cpu_pct_median": median([r.get("balancer_cpu_pct") for r in good]),
                "ignored_errors_total": sum(r.get("ignored_errors", 0) or 0 for r in rs),
                "balancer_died": sum(1 for r in rs if r.get("bal_alive_after") == 0),
                "rounds_started_busy": sum(1 for r in rs if (r.get("cpu_busy_before") or 0) >= float(params.get("quiet_max", 0.15))),
                "node_query_share_pct_median": [median([r["node_query_share_pct"][i] for r in good if "node_query_share_pct" in r]) for i in range(3)],
            }
            if w == "conn_per_trx":
                s["failed_connects_total"] = sum(r.get("failed_connects", 0) for r in rs)
                s["failed_trx_total"] = sum(r.get("failed_trx", 0) for r in rs)
            summary[w][p] = s
        direct = summary[w].get("direct", {})
        direct_all = summary[w].get("direct-all", {})
        for p, s in summary[w].items():
            if direct_all.get("tps_median") and s["tps_median"] is not None:
                s["tps_ratio_to_direct_all"] = round(s["tps_median"] / direct_all["tps_median"], 3)
            if direct.get("tps_median") and s["tps_median"] is not None:
                s["tps_ratio_to_direct"] = round(s["tps_median"] / direct["tps_median"], 3)
            if direct.get("p95_ms_median") and s["p95_ms_median"] is not None:
                s["p95_ratio_to_direct"] = round(s["p95_ms_median"] / direct["p95_ms_median"], 3)

    write_doc(out_json, "galera-bench", env, versions, params, commands, summary=summary, runs=runs)

    # Markdown
    print(f"Medians of {params.get('rounds')} round(s) of {params.get('time_s')} s "
          f"(+{params.get('warmup_s')} s warm-up), {params.get('threads')} sysbench threads; "
          f"balancer on CPU {params.get('balancer_cpu')}, mariadbd and sysbench unpinned.\n")
    print("| workload | path | TPS | × direct | × direct-all | p95 ms | × direct | balancer CPU | notes |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for w in workloads:
        for p in paths:
            s = summary[w].get(p)
            if not s:
                continue
            notes = []
            if s["rounds_failed"]:
                notes.append(f"{s['rounds_failed']} of {s['rounds']} rounds failed")
            if s["rounds_started_busy"]:
                notes.append(f"{s['rounds_started_busy']} round(s) started on a busy machine")
            if s["balancer_died"]:
                notes.append(f"balancer died {s['balancer_died']}×")
            if s.get("failed_connects_total"):
                notes.append(f"{s['failed_connects_total']} failed connects")
            if s.get("failed_trx_total"):
                notes.append(f"{s['failed_trx_total']} failed trx")
            if s["ignored_errors_total"]:
                notes.append(f"{s['ignored_errors_total']} deadlocks retried")
            share = s["node_query_share_pct_median"]
            if p != "direct" and all(x is not None for x in share):
                notes.append("queries/node " + "/".join(f"{x:.0f}" for x in share) + " %")
            cpu = s["balancer_cpu_pct_median"]
            print(f"| {w} | {p} | {fmt(s['tps_median'])} | {fmt(s.get('tps_ratio_to_direct'), '.2f')} "
                  f"| {fmt(s.get('tps_ratio_to_direct_all'), '.2f')} "
                  f"| {fmt(s['p95_ms_median'], '.2f')} | {fmt(s.get('p95_ratio_to_direct'), '.2f')} "
                  f"| {fmt(cpu, '.0f') + ' %' if cpu is not None else '–'} | {'; '.join(notes)} |")
    print(f"\nJSON: {out_json}")


# ---------------------------------------------------------------- failover

def failover(workdir, out_json):
    env, versions, params, commands = read_env(workdir)
    bucket_ms = int(params.get("bucket_ms", 10))
    hang_s = float(params.get("hang_s", 10))
    results = []
    for d, r in read_runs(workdir):
        sb = parse_sysbench(os.path.join(d, "sysbench.out"))
        r["sysbench_finished"] = "tps" in sb
        if sb.get("fatal_errors"):
            r["driver_errors"] = sb["fatal_errors"]
        prog = parse_progress(d, bucket_ms)
        b = lambda ms: int(ms // bucket_ms)
        start_b = b(r["start_ms"])
        kill_b = b(r["kill_ms"])
        load_end_b = b(r["start_ms"] + 1000 * r["duration_s"])
        first_ok = min(prog["ok"]) if prog["ok"] else None
        r["committed"] = sum(prog["ok"].values())
        r["failed_connects"] = failures(prog, "connect")
        r["failed_trx"] = failures(prog, "trx")
        r["failed_connects_before_kill"] = failures(prog, "connect", hi=kill_b)
        r["failed_trx_before_kill"] = failures(prog, "trx", hi=kill_b)
        restart_b = b(r["restart_ms"]) if r.get("restart_ms") else None
        r["failed_connects_after_kill"] = failures(prog, "connect", lo=kill_b, hi=restart_b)
        r["failed_trx_after_kill"] = failures(prog, "trx", lo=kill_b, hi=restart_b)
        if restart_b is not None:
            r["failed_connects_after_restart"] = failures(prog, "connect", lo=restart_b)
            r["failed_trx_after_restart"] = failures(prog, "trx", lo=restart_b)
        c0 = str(r.get("node_connections_last10s_before", "")).split()
        c1 = str(r.get("node_connections_last10s_after", "")).split()
        if c0 and c1 and len(c0) == len(c1):
            # A node down at the first sample counts from 0 (it restarted).
            r["node_connections_last10s"] = [
                (int(y) - (int(x) if x.isdigit() else 0)) if y.isdigit() else None for x, y in zip(c0, c1)]
        gap, gap_start, to_end = longest_stall(prog["ok"], first_ok if first_ok is not None else start_b, load_end_b)
        r["longest_stall_s"] = round((gap + 1) * bucket_ms / 1000, 2) if gap else 0.0
        r["longest_stall_start_rel_kill_s"] = round((gap_start - kill_b) * bucket_ms / 1000, 2)
        r["stall_reaches_end"] = bool(to_end and gap)
        # Throughput before the kill (from 1 s after the start) and over the
        # last 10 s of the load.
        per_s = 1000 // bucket_ms

        def rate(lo, hi):
            if hi <= lo:
                return None
            return round(sum(n for x, n in prog["ok"].items() if lo <= x < hi) / ((hi - lo) / per_s), 1)
        r["tps_before_kill"] = rate(start_b + per_s, kill_b)
        r["tps_last_10s"] = rate(max(kill_b, load_end_b - 10 * per_s), load_end_b)
        # The killed node, sampled once a second: Synced again, and back in
        # the balancer's rotation (new connections well above the sampler's
        # own one per sample: more than a tenth of a fair share of the
        # pre-kill rate, and at least 20 per second).
        samples = []
        try:
            for line in open(os.path.join(d, "killed_node.txt")):
                p = line.split()
                if len(p) == 3:
                    samples.append((int(p[0]), int(p[1]), int(p[2])))
        except FileNotFoundError:
            pass
        if r.get("restart_ms") and samples:
            ref = r["restart_ms"]
            synced = next((t for t, st, _ in samples if t >= ref and st == 4), None)
            threshold = max(20, 0.1 * (r.get("tps_before_kill") or 0) / 3)
            back = None
            for (ta, sa, ca), (tb, sb_, cb) in zip(samples, samples[1:]):
                if ta >= ref and ca > 0 and cb > ca and (cb - ca - 1) / ((tb - ta) / 1000) >= threshold:
                    back = ta
                    break
            r["killed_node_synced_s_after_restart"] = None if synced is None else round((synced - ref) / 1000, 1)
            r["killed_node_in_rotation_s_after_restart"] = None if back is None else round((back - ref) / 1000, 1)
            r["killed_node_samples"] = {"columns": ["ms_after_restart", "wsrep_local_state", "connections"],
                                        "rows": [[t - ref, st, c] for t, st, c in samples]}
        hang_b = int(hang_s * per_s)
        stuck = [t for t, lo in prog["last_ok"].items() if lo is None or lo < load_end_b - hang_b]
        r["threads"] = len(prog["last_ok"])
        r["threads_stuck_at_end"] = len(stuck)
        r["hung"] = bool(gap >= hang_b)
        r["did_not_recover"] = bool(r["hung"] and to_end)
        # Per second, from 3 s before the kill to the end of the load.
        tl = []
        for sec in range(-3, int((load_end_b - kill_b) / per_s) + 1):
            lo = kill_b + sec * per_s
            tl.append([sec,
                       sum(n for x, n in prog["ok"].items() if lo <= x < lo + per_s),
                       sum(n for x, n in prog["fail"].get("connect", {}).items() if lo <= x < lo + per_s),
                       sum(n for x, n in prog["fail"].get("trx", {}).items() if lo <= x < lo + per_s)])
        r["per_second_from_kill"] = {"columns": ["s_after_kill", "committed", "failed_connects", "failed_trx"], "rows": tl}
        if prog["msgs"]:
            r["failure_messages"] = dict(prog["msgs"].most_common(10))
        results.append(r)

    results.sort(key=lambda r: r.get("start_ms", 0))
    write_doc(out_json, "galera-failover", env, versions, params, commands, runs=results)

    rejoin = params.get("rejoin_at_s", 0)
    print(f"Connection-per-transaction load ({params.get('threads')} threads, {params.get('duration_s')} s"
          f"{', with an UPDATE' if params.get('write') == 1 else ''}); node {params.get('kill_node')} SIGKILLed at "
          f"{params.get('kill_at_s')} s" + (f", restarted at {rejoin} s" if rejoin else ", restarted after the load")
          + f"; hung = no commit for ≥ {params.get('hang_s')} s. Failures: after the kill"
          + (" / after the restart" if rejoin else "") + ".\n")
    print("| path | failed connects | failed trx | longest stall | hung | TPS before kill → last 10 s | restarted node Synced → in rotation | connections per node, last 10 s | probe after | notes |")
    print("| --- | ---: | ---: | ---: | --- | --- | --- | --- | --- | --- |")
    for r in results:
        notes = []
        if (r.get("cpu_busy_before") or 0) >= float(params.get("quiet_max", 0.15)):
            notes.append(f"machine {r['cpu_busy_before']:.0%} busy before the run")
        if r.get("bal_alive_after") == 0:
            notes.append("balancer died")
        if r.get("bal_needed_sigkill") == 1:
            notes.append("balancer ignored SIGTERM")
        if r["hung"] and r.get("bal_cpu_pct_after_kill") is not None:
            notes.append(f"balancer CPU after the kill {r['bal_cpu_pct_after_kill']} %")
        if not r["sysbench_finished"]:
            notes.append("sysbench stopped by the watchdog")
        if r["threads_stuck_at_end"]:
            notes.append(f"{r['threads_stuck_at_end']}/{r['threads']} clients stuck at the end")
        if r["failed_connects_before_kill"] or r["failed_trx_before_kill"]:
            notes.append(f"{r['failed_connects_before_kill']}+{r['failed_trx_before_kill']} failures before the kill")
        if r.get("rejoin_s") is not None and "killed_node_synced_s_after_restart" not in r:
            notes.append(f"node Synced {r['rejoin_s']} s after its restart")
        hung = "no"
        if r["hung"]:
            hung = "**yes, never recovered**" if r["did_not_recover"] else "**yes** (recovered)"
        stall = f"{r['longest_stall_s']:.2f} s"
        if r["longest_stall_s"]:
            stall += f" (at kill{r['longest_stall_start_rel_kill_s']:+.2f} s)"
        fc = str(r["failed_connects_after_kill"])
        ft = str(r["failed_trx_after_kill"])
        if "failed_connects_after_restart" in r:
            fc += f" / {r['failed_connects_after_restart']}"
            ft += f" / {r['failed_trx_after_restart']}"
        share = r.get("node_connections_last10s")
        share = " / ".join("–" if x is None else f"{x:,}" for x in share) if share else "–"
        probe = f"{r.get('probe_ok', 0)}/{r.get('probes', 0)} ok"
        if "killed_node_synced_s_after_restart" in r:
            sy, ro = r["killed_node_synced_s_after_restart"], r["killed_node_in_rotation_s_after_restart"]
            rot = ("–" if sy is None else f"+{sy:.0f} s") + " → " + ("never" if ro is None else f"+{ro:.0f} s")
        else:
            rot = "(after the load)"
        print(f"| {r['label']} | {fc} | {ft} | {stall} | {hung} "
              f"| {fmt(r['tps_before_kill'])} → {fmt(r['tps_last_10s'])} | {rot} | {share} "
              f"| {probe} | {'; '.join(notes)} |")
    print(f"\nJSON: {out_json}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("bench", "failover"):
        sys.exit(__doc__)
    {"bench": bench, "failover": failover}[sys.argv[1]](sys.argv[2], sys.argv[3])
