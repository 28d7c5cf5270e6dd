#!/usr/bin/env bash
# ringpen quick start: builds ringpen, starts two throwaway HTTP backends on
# 127.0.0.1 and two balancers in front of them, and shows what to try.
#
#   deploy/quickstart.sh          run until Ctrl-C, then stop everything
#   deploy/quickstart.sh --demo   send a few requests, print where they went, stop
#
# RINGPEN_PORT sets the port of the balancer with client tracking (default
# 8080); the one with -r (round robin, no tracking) listens on the next port.
# Needs cargo and python3; curl is used when present, else Python.
set -euo pipefail

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
}

demo=false
case "${1:-}" in
"") ;;
--demo) demo=true ;;
-h | --help)
    usage
    exit 0
    ;;
*)
    echo "quickstart.sh: unknown argument '$1' (try --help)" >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")/.."

port=${RINGPEN_PORT:-8080}
if ! [[ $port =~ ^[1-9][0-9]{0,4}$ ]] || ((port > 65534)); then
    echo "quickstart.sh: RINGPEN_PORT must be a port number below 65535, got '$port'" >&2
    exit 2
fi
rr_port=$((port + 1))

for tool in cargo python3; do
    if ! command -v "$tool" >/dev/null; then
        echo "quickstart.sh: '$tool' is needed but not installed" >&2
        exit 1
    fi
done

# Build unless the release binary is already newer than every source file.
bin=${CARGO_TARGET_DIR:-target}/release/ringpen
if [[ ! -x $bin ]] || [[ -n $(find src Cargo.toml Cargo.lock -newer "$bin" -print -quit 2>/dev/null) ]]; then
    echo "==> cargo build --release"
    cargo build --release
else
    echo "==> $bin is up to date"
fi

# Everything we start, stopped by pid on any exit (Ctrl-C, error or done).
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ringpen-quickstart.XXXXXX")
pids=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
    if ((${#pids[@]})); then
        echo "==> stopped the balancers and the backends"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A backend: an HTTP server on a free port of 127.0.0.1 that answers every
# GET with its own name. It writes its port to a file once it listens.
cat >"$tmp/backend.py" <<'EOF'
import http.server, os, sys

name, port_file = sys.argv[1], sys.argv[2]
body = f"backend {name}\n".encode()

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write(f"backend {name}: {self.client_address[0]} {fmt % args}\n")

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.rename(port_file + ".tmp", port_file)
server.serve_forever()
EOF

# The request the demo makes when curl is missing: like
# `curl --interface SRC http://127.0.0.1:PORT/`, printing the body.
cat >"$tmp/get.py" <<'EOF'
import socket, sys

src, port = sys.argv[1], int(sys.argv[2])
with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(src, 0)) as s:
    s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
print(data.partition(b"\r\n\r\n")[2].decode().strip())
EOF

# Whether something listens on TCP port $1 (read from /proc, so that the
# check itself does not connect and become a client of the balancer).
listening() {
    local hex table tables=()
    hex=$(printf '%04X' "$1")
    for table in /proc/net/tcp /proc/net/tcp6; do
        if [[ -r $table ]]; then tables+=("$table"); fi
    done
    awk -v port=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == port { found = 1 } END { exit !found }' \
        "${tables[@]}"
}

# wait_for PID WHAT LOG COMMAND...: waits (at most 10 s) until COMMAND
# succeeds; fails, showing LOG, if process PID exits first.
wait_for() {
    local pid=$1 what=$2 log=$3
    shift 3
    for _ in $(seq 100); do
        if "$@"; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "quickstart.sh: $what exited; its output:" >&2
            cat "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "quickstart.sh: $what did not start within 10 s; its output:" >&2
    cat "$log" >&2
    exit 1
}

declare -A backend_port
for name in A B; do
    python3 "$tmp/backend.py" "$name" "$tmp/$name.port" 2>"$tmp/backend-$name.log" &
    pids+=($!)
    wait_for $! "backend $name" "$tmp/backend-$name.log" test -s "$tmp/$name.port"
    backend_port[$name]=$(cat "$tmp/$name.port")
done
a=127.0.0.1:${backend_port[A]}
b=127.0.0.1:${backend_port[B]}
echo "==> backend A on $a, backend B on $b"

start_balancer() {
    local log=$1 listen_port=$2
    shift 2
    if listening "$listen_port"; then
        echo "quickstart.sh: port $listen_port is already in use; set RINGPEN_PORT to another port" >&2
        exit 1
    fi
    echo "==> $bin $*"
    "$bin" "$@" 2>"$log" &
    pids+=($!)
    wait_for $! "ringpen ($*)" "$log" listening "$listen_port"
}
start_balancer "$tmp/ringpen.log" "$port" -f "127.0.0.1:$port" "$a" "$b"
start_balancer "$tmp/ringpen-rr.log" "$rr_port" -f -r "127.0.0.1:$rr_port" "$a" "$b"

# GET / from source address $1 through the balancer on port $2.
get() {
    if command -v curl >/dev/null; then
        curl -sS --max-time 5 --interface "$1" "http://127.0.0.1:$2/"
    else
        python3 "$tmp/get.py" "$1" "$2"
    fi
}

if ! $demo; then
    cat <<EOF

ringpen is balancing 127.0.0.1:$port (client tracking, Pen's default) and
127.0.0.1:$rr_port (-r: round robin, no tracking) over backends A and B.
Each backend answers with its name. Try, in another terminal:

  # Tracking: a client keeps going to the server it got first.
  curl --interface 127.0.0.2 http://127.0.0.1:$port/     # run it a few times
  # New clients are spread round robin: another source address may get the other one.
  curl --interface 127.0.0.3 http://127.0.0.1:$port/
  curl --interface 127.0.0.4 http://127.0.0.1:$port/
  # With -r every request goes to the next server, whoever sends it.
  curl --interface 127.0.0.2 http://127.0.0.1:$rr_port/  # run it a few times

  # Per-server statistics, printed on this terminal:
  kill -USR1 ${pids[2]}

Press Ctrl-C to stop the balancers and the backends.
EOF
    if ! command -v curl >/dev/null; then
        echo "(curl is not installed: 'deploy/quickstart.sh --demo' makes these requests with Python.)"
    fi
    # Show the balancers' diagnostics (SIGUSR1 output included) here.
    tail -n +1 -f "$tmp/ringpen.log" "$tmp/ringpen-rr.log" &
    pids+=($!)
    wait "${pids[2]}" "${pids[3]}"
    exit 0
fi

echo
failed=0
echo "Client tracking (127.0.0.1:$port): 4 requests from 127.0.0.2"
seen=()
for _ in 1 2 3 4; do
    answer=$(get 127.0.0.2 "$port")
    echo "  127.0.0.2 -> $answer"
    seen+=("$answer")
done
if [[ $(printf '%s\n' "${seen[@]}" | sort -u | wc -l) -eq 1 ]]; then
    echo "  all four went to the same backend: the client is tracked"
else
    echo "  UNEXPECTED: the requests went to different backends"
    failed=1
fi

echo "New clients (127.0.0.1:$port): one request each from 127.0.0.3 and 127.0.0.4"
three=$(get 127.0.0.3 "$port")
four=$(get 127.0.0.4 "$port")
echo "  127.0.0.3 -> $three"
echo "  127.0.0.4 -> $four"
if [[ $three != "$four" ]]; then
    echo "  new clients are spread round robin"
else
    echo "  UNEXPECTED: both new clients went to the same backend"
    failed=1
fi

echo "Round robin without tracking (-r, 127.0.0.1:$rr_port): 4 requests from 127.0.0.2"
seen=()
for _ in 1 2 3 4; do
    answer=$(get 127.0.0.2 "$rr_port")
    echo "  127.0.0.2 -> $answer"
    seen+=("$answer")
done
if [[ ${seen[0]} != "${seen[1]}" && ${seen[0]} == "${seen[2]}" && ${seen[1]} == "${seen[3]}" ]]; then
    echo "  the requests alternate between the backends"
else
    echo "  UNEXPECTED: the requests did not alternate"
    failed=1
fi

echo
if ((failed)); then
    echo "demo: FAILED"
    exit 1
fi
echo "demo: OK"
