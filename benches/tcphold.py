"""tcphold: idle TCP connections for benches/compare.sh (balancer memory per
held connection).  Not part of the crate.

  tcphold.py hold PORT COUNTFILE
      Backend: accepts connections on 127.0.0.1:PORT and holds them (reads
      and discards whatever comes, closes on EOF); the number it holds goes
      to COUNTFILE, rewritten at most every 50 ms when it changes.

  tcphold.py connect HOST:PORT N
      Client: opens N connections (at most 200 handshakes in flight, so no
      listen backlog overflows), retrying a failed one up to 3 times; prints
      "connected N_OK failed N_FAILED" when done, then holds them until its
      standard input closes or it gets SIGTERM.

  tcphold.py rss HOST:PORT N COUNTFILE TIMEOUT_S PID...
      Reads VmRSS and Pss summed over the PIDs (the balancer's processes:
      idle), starts `connect HOST:PORT N` as a child process, waits (at
      most TIMEOUT_S) until it has connected and COUNTFILE says the backend
      holds N, lets things settle for 1 s, reads VmRSS and Pss again (held),
      closes the connections, waits (at most 10 s) until the backend sees
      them all closed, and prints one JSON object.

Each process raises its open-files soft limit to the hard limit.
"""
import errno
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lib  # noqa: E402


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def write_count(path, n):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{n}\n")
    os.replace(tmp, path)


def read_count(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def hold(port, countfile):
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(4096)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ)
    held, written, last = 0, -1, 0.0
    write_count(countfile, 0)
    while True:
        for key, _ in sel.select(0.05):
            s = key.fileobj
            if s is ls:
                while True:
                    try:
                        c, _ = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:  # EMFILE and the like: leave it in the queue
                        if e.errno in (errno.EMFILE, errno.ENFILE):
                            time.sleep(0.01)
                        break
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ)
                    held += 1
            else:
                try:
                    data = s.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(s)
                    s.close()
                    held -= 1
        now = time.monotonic()
        if held != written and now - last >= 0.05:
            write_count(countfile, held)
            written, last = held, now


def connect(target, n):
    raise_nofile()
    host, port = target.rsplit(":", 1)
    addr = (host, int(port))
    sel = selectors.DefaultSelector()
    done, failed, pending, tries = [], 0, 0, {}
    todo = n

    def start(attempt):
        nonlocal pending
        s = socket.socket()
        s.setblocking(False)
        rc = s.connect_ex(addr)
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            return False
        sel.register(s, selectors.EVENT_WRITE)
        tries[s] = attempt
        pending += 1
        return True

    deadline = time.monotonic() + 120
    while (todo or pending) and time.monotonic() < deadline:
        while todo and pending < 200:
            todo -= 1
            if not start(0):
                failed += 1
        for key, _ in sel.select(0.5):
            s = key.fileobj
            sel.unregister(s)
            pending -= 1
            attempt = tries.pop(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                done.append(s)
            else:
                s.close()
                if attempt >= 3 or not start(attempt + 1):
                    failed += 1
    failed += pending + todo
    print(f"connected {len(done)} failed {failed}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        sys.stdin.read()
    finally:
        for s in done:
            s.close()


def mem(pids):
    rss = [lib.rss_kib(p) for p in pids]
    pss = [lib.pss_kib(p) for p in pids]
    return (sum(x for x in rss if x is not None), sum(x for x in pss if x is not None),
            sum(x is None for x in rss))


def rss(target, n, countfile, timeout, pids):
    rec = {"connections": n, "balancer_pids": pids}
    rec["idle_rss_kib"], rec["idle_pss_kib"], _ = mem(pids)
    tcp0 = lib.tcp_counters()
    t0 = time.monotonic()
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "connect", target, str(n)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        # The client's summary line, bounded by a watchdog on the child.
        line = ""
        sel = selectors.DefaultSelector()
        sel.register(child.stdout, selectors.EVENT_READ)
        while time.monotonic() - t0 < timeout and child.poll() is None:
            if sel.select(0.2):
                line = child.stdout.readline()
                break
        f = line.split()
        rec["client_connected"] = int(f[1]) if len(f) == 4 else None
        rec["client_failed"] = int(f[3]) if len(f) == 4 else None
        while time.monotonic() - t0 < timeout and read_count(countfile) < n \
                and all(lib.alive(p) for p in pids[:1]):
            time.sleep(0.05)
        rec["backend_held"] = read_count(countfile)
        rec["connect_s"] = time.monotonic() - t0
        rec["complete"] = rec["backend_held"] >= n and rec["client_connected"] == n
        # Listen queue overflows (SYNs dropped, retried after 1 s) and the like.
        rec["kernel_tcp"] = lib.counters_delta(tcp0, lib.tcp_counters())
        time.sleep(1)
        rec["held_rss_kib"], rec["held_pss_kib"], rec["pids_gone"] = mem(pids)
        rec["backend_held_at_reading"] = read_count(countfile)
        rec["balancer_alive"] = lib.alive(pids[0])
    finally:
        try:
            child.stdin.close()
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    t1 = time.monotonic()
    while read_count(countfile) > 0 and time.monotonic() - t1 < 10:
        time.sleep(0.05)
    rec["backend_left_after_close"] = read_count(countfile)
    rec["release_s"] = time.monotonic() - t1
    if rec["connections"]:
        rec["per_conn_rss_kib"] = (rec["held_rss_kib"] - rec["idle_rss_kib"]) / n
        rec["per_conn_pss_kib"] = (rec["held_pss_kib"] - rec["idle_pss_kib"]) / n
    print(json.dumps(rec))


def main():
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "hold":
        hold(int(a[0]), a[1])
    elif cmd == "connect":
        connect(a[0], int(a[1]))
    elif cmd == "rss":
        rss(a[0], int(a[1]), a[2], float(a[3]), [int(p) for p in a[4:]])
    else:
        sys.exit(f"tcphold.py: unknown command {cmd}")


if __name__ == "__main__":
    main()
