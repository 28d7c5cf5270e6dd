"""Shared by the benchmark scripts in benches/ (udp_compare.sh, compare.sh).

Command line (the scripts call it through benches/lib.sh):

  python3 benches/lib.py wait_quiet CPU_A CPU_B LIMIT_S
      Returns when both CPUs were under 10% busy over 0.5 s, or after
      LIMIT_S seconds (with a note on stderr).

  python3 benches/lib.py measure --out FILE [--bal PID]... [--ours PID]...
          [--ksoft0 PID] [--ksoft1 PID] [--cpu0 N] [--cpu1 N] [--timeout S]
          [--threshold F] -- CMD [ARG...]
      Runs CMD (inheriting this process's CPU affinity: start it pinned to
      the load CPU) and writes one JSON object to FILE: CMD's exit code and
      output, the wall time, the CPU time over exactly that window of the
      balancer's processes (--bal, utime+stime of /proc/PID/stat, which
      covers all threads of a process), of the other benchmark processes
      (--ours: backends), of CMD and its children (rusage), of the two
      ksoftirqd threads, and per CPU from /proc/stat.  "foreign" CPU is
      the busy time of a CPU that none of these accounts for; all other
      processes' CPU time is summed from a scan of /proc before and after
      (processes that start and end within the window escape it).  Other
      processes above --threshold (0.05) of a CPU, foreign CPU above
      --residual (0.10) of either CPU, or steal above --threshold mark the
      window disturbed.

  python3 benches/lib.py bindable PORT...
      Exit 0 when a TCP socket with SO_REUSEADDR (as every balancer, iperf3
      and the holder set it) can bind 127.0.0.1:PORT for each PORT.  ss is
      not enough: a TIME-WAIT socket of someone else's outgoing connection
      from that port blocks the bind too.

  python3 benches/lib.py hold_ports READY_FILE TIMEOUT_S PORT...
      Binds a TCP socket with SO_REUSEADDR to 127.0.0.1:PORT for each PORT
      (retrying for up to TIMEOUT_S while one is taken), without listening,
      writes READY_FILE and sleeps until killed.  A bound port is never
      handed out as an ephemeral port for outgoing connections, so the
      benchmark's ports stay free between balancer restarts however many
      connections other processes open, while a balancer can still bind and
      listen on them (SO_REUSEADDR on both sides, only one listener).

  python3 benches/lib.py reserve_ports PORT|FIRST-LAST...
      Adds those of the ports or ranges not in it yet to
      net.ipv4.ip_local_reserved_ports (kept on top of what is there) and
      prints them, comma-separated (nothing when all were there).  Used by
      benches/lib.sh and deploy/galera/lib.sh.

Importable too (sys.path.insert(0, "benches")): proc_ticks, rss_kib,
pss_kib, alive, tcp_counters, counters_delta, median, ratio, machine,
pkg_version, run.
"""
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def cpu_stat():
    """{cpu index: (busy ticks, idle ticks, steal ticks)} from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            v = list(map(int, vals[:8]))  # user nice system idle iowait irq softirq steal
            out[int(name[3:])] = (v[0] + v[1] + v[2] + v[5] + v[6], v[3] + v[4], v[7])
    return out


def _stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rindex(")") + 2:].split()


def proc_ticks(pid):
    """utime+stime of a whole process (all its threads), in clock ticks, or None."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[11]) + int(fields[12])


TCP_COUNTERS = ("TcpExt:ListenOverflows", "TcpExt:ListenDrops", "TcpExt:TCPTimeWaitOverflow",
                "Tcp:RetransSegs", "Tcp:AttemptFails", "Tcp:EstabResets")


def tcp_counters():
    """The kernel's TCP counters of TCP_COUNTERS (/proc/net/netstat, snmp)."""
    out = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        with open(path) as f:
            lines = f.read().splitlines()
        for head, vals in zip(lines[::2], lines[1::2]):
            proto = head.split(":")[0]
            for k, v in zip(head.split()[1:], vals.split()[1:]):
                if f"{proto}:{k}" in TCP_COUNTERS:
                    out[f"{proto}:{k}"] = int(v)
    return out


def counters_delta(a, b):
    return {k: b[k] - a.get(k, 0) for k in b}


def _status_kib(pid, path, key):
    """The kB figure after "key:" in /proc/PID/path (pid None: /proc/path)."""
    try:
        with open(f"/proc/{path}" if pid is None else f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kib(pid):
    return _status_kib(pid, "status", "VmRSS")


def pss_kib(pid):
    return _status_kib(pid, "smaps_rollup", "Pss")


def alive(pid):
    """True when pid exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in "ZX"


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return a / b if a is not None and b else None


def run(*args, **kw):
    """stdout+stderr of a command, stripped, or None if it cannot run."""
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=10, **kw)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return None


def pkg_version(name):
    return run("dpkg-query", "-W", "-f", "${Version}", name) or None


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = _status_kib(None, "meminfo", "MemTotal")
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "mem_total_kib": mem, "os": run("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME")}


def wait_quiet(cpu_a, cpu_b, limit):
    cpus = [int(cpu_a), int(cpu_b)]
    start, said = time.time(), False
    while True:
        a = cpu_stat()
        time.sleep(0.5)
        b = cpu_stat()
        busy = {}
        for c in cpus:
            db, di, ds = (b[c][i] - a[c][i] for i in range(3))
            busy[c] = (db + ds) / max(1, db + di + ds)
        if max(busy.values()) < 0.10:
            return
        if time.time() - start > limit:
            print(f"  (CPUs still busy after {limit:.0f} s: "
                  f"{', '.join(f'cpu{c} {100 * x:.0f}%' for c, x in busy.items())}; measuring anyway)",
                  file=sys.stderr)
            return
        if not said:
            print(f"  (waiting for quiet CPUs: {', '.join(f'cpu{c} {100 * x:.0f}%' for c, x in busy.items())})",
                  file=sys.stderr)
            said = True


def _ticks(pids):
    """Sum of proc_ticks over pids; the pids that vanished are left out."""
    return {p: t for p in pids if (t := proc_ticks(p)) is not None}


def _all_procs():
    """{pid: (ticks, name, start time)} for every process."""
    out = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    s = f.read()
            except OSError:
                continue
            fields = s[s.rindex(")") + 2:].split()
            out[int(p)] = (int(fields[11]) + int(fields[12]), s[s.index("(") + 1:s.rindex(")")], fields[19])
    return out


def _self_children_s():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def measure(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="lib.py measure")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bal", type=int, action="append", default=[])
    ap.add_argument("--ours", type=int, action="append", default=[])
    ap.add_argument("--ksoft0", type=int, default=0)
    ap.add_argument("--ksoft1", type=int, default=0)
    ap.add_argument("--cpu0", type=int, default=0)
    ap.add_argument("--cpu1", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--residual", type=float, default=0.10)
    ap.add_argument("cmd", nargs="+")
    a = ap.parse_args(argv)
    groups = {"bal": a.bal, "ours": a.ours, "k0": [a.ksoft0] if a.ksoft0 else [],
              "k1": [a.ksoft1] if a.ksoft1 else []}
    procs0 = _all_procs()
    before = {g: _ticks(p) for g, p in groups.items()}
    self0, kids0 = _self_children_s()
    tcp0 = tcp_counters()
    cs0, t0 = cpu_stat(), time.monotonic()
    rec = {"cmd": a.cmd, "timed_out": False}
    try:
        p = subprocess.run(a.cmd, capture_output=True, text=True, timeout=a.timeout)
        rec["rc"], out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rec["rc"], rec["timed_out"] = None, True
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    t1, cs1 = time.monotonic(), cpu_stat()
    rec["kernel_tcp"] = counters_delta(tcp0, tcp_counters())
    after = {g: _ticks(p) for g, p in groups.items()}
    self1, kids1 = _self_children_s()
    procs1 = _all_procs()
    secs = t1 - t0
    rec.update({"stdout": out, "stderr_tail": err[-2000:], "secs": secs})

    def delta(g):
        return sum(after[g][p] - before[g][p] for p in after[g] if p in before[g]) / HZ

    bal, ours, k0, k1 = delta("bal"), delta("ours"), delta("k0"), delta("k1")
    cmd_cpu, own = kids1 - kids0, self1 - self0
    rec["balancer_cpu_s"] = bal if a.bal else None
    rec["balancer_pids_gone"] = [p for p in a.bal if p not in after["bal"]]
    rec.update({"backend_cpu_s": ours, "loadgen_cpu_s": cmd_cpu, "measure_cpu_s": own,
                "ksoftirqd0_s": k0, "ksoftirqd1_s": k1})
    cpus = {}
    for c in (a.cpu0, a.cpu1):
        b, i, st = (cs1[c][j] - cs0[c][j] for j in range(3))
        cpus[c] = {"busy_s": b / HZ, "idle_s": i / HZ, "steal_s": st / HZ}
    c0, c1 = cpus[a.cpu0], cpus[a.cpu1]
    rec["cpu0_busy"] = c0["busy_s"] / secs
    rec["cpu1_busy"] = c1["busy_s"] / secs
    # Whatever ran on the two CPUs besides the benchmark (tick accounting: +-0.02 s).
    rec["foreign_cpu0"] = max(0.0, c0["busy_s"] - (bal if a.bal else 0) - k0) / secs
    rec["foreign_cpu1"] = max(0.0, c1["busy_s"] - ours - cmd_cpu - own - k1) / secs
    rec["steal"] = (c0["steal_s"] + c1["steal_s"]) / secs
    # Other processes seen at the end of the window (those that ended within
    # it are missed): the main users, for the record.
    ours_pids = {os.getpid()} | {p for g in groups.values() for p in g}
    others = []
    for p, (t, name, start) in procs1.items():
        # (a kworker's name changes with its work; the start time does not)
        d = (t - procs0[p][0]) if p in procs0 and procs0[p][2] == start else t
        if p not in ours_pids and d > 0:
            others.append((d / HZ, name, p))
    others.sort(reverse=True)
    rec["other_processes_cpu_s"] = sum(o[0] for o in others)
    rec["other_processes_top"] = [{"pid": p, "name": n, "cpu_s": c} for c, n, p in others[:5]]
    rec["other_processes_share"] = rec["other_processes_cpu_s"] / secs
    # Other processes (seen by the scan) above --threshold of a CPU, or
    # unaccounted CPU time above --residual (it also holds kernel work the
    # benchmark causes outside any process's context, e.g. softirq and RCU
    # callbacks while a CPU is otherwise idle: up to 7% of CPU 0 has been
    # seen with direct new-connection load, which leaves CPU 0 idle), or
    # steal above --threshold.
    rec["disturbed"] = (rec["other_processes_share"] > a.threshold or rec["steal"] > a.threshold
                        or max(rec["foreign_cpu0"], rec["foreign_cpu1"]) > a.residual)
    with open(a.out, "w") as f:
        json.dump(rec, f)


def _bind(port):
    import socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    return s


def hold_ports(ready, limit, ports):
    held, deadline = {}, time.monotonic() + limit
    while True:
        for p in ports:
            if p not in held and (s := _bind(p)) is not None:
                held[p] = s
        if len(held) == len(ports):
            break
        if time.monotonic() > deadline:
            sys.exit(f"TCP port(s) {sorted(set(ports) - set(held))} stayed in use for {limit:.0f} s")
        time.sleep(0.2)
    with open(ready, "w") as f:
        f.write(" ".join(map(str, ports)) + "\n")
    while True:
        time.sleep(3600)


RESERVED_PORTS = "/proc/sys/net/ipv4/ip_local_reserved_ports"


def _port_set(spec):
    """The ports of a reserved-ports style list: "33061-33063,39200"."""
    ports = set()
    for part in filter(None, spec.replace(" ", "").split(",")):
        first, _, last = part.partition("-")
        ports.update(range(int(first), int(last or first) + 1))
    return ports


def reserve_ports(specs):
    with open(RESERVED_PORTS) as f:
        current = f.read().strip()
    reserved = _port_set(current)
    missing = [spec for spec in specs if not _port_set(spec) <= reserved]
    if missing:
        with open(RESERVED_PORTS, "w") as f:
            f.write(",".join(filter(None, [current] + missing)))
        print(",".join(missing))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "wait_quiet":
        wait_quiet(args[0], args[1], float(args[2]))
    elif cmd == "measure":
        measure(args)
    elif cmd == "bindable":
        socks = [_bind(int(p)) for p in args]
        sys.exit(0 if all(socks) else 1)
    elif cmd == "reserve_ports":
        reserve_ports(args)
    elif cmd == "hold_ports":
        hold_ports(args[0], float(args[1]), [int(p) for p in args[2:]])
    else:
        sys.exit(f"lib.py: unknown command {cmd}")


if __name__ == "__main__":
    main()
