# Sourced by the replication scripts in bench/: devices A and B on loopback.
#
#   start_devices   A on CPU 0 (NBD 11909, API 11990), B on CPU 1 (NBD 11919, API 11991),
#                   data in $W; sets A, B, MP and MIRRORPOOL_API (A's).
# Servers are stopped by PID on exit (continued first, if a script stopped one).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MP="$ROOT/.venv/bin/mirrorpool"
W=$(mktemp -d "/tmp/$(basename "$0" .sh)-XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
wait_port() {
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done
    echo "port $1 not up" >&2
    exit 1
}
start_devices() {
    taskset -c 0 "$MP" serve --data "$W/a" --listen 127.0.0.1:11909 --api 127.0.0.1:11990 \
        > "$W/a.log" 2>&1 &
    A=$!; PIDS+=("$A")
    taskset -c 1 "$MP" serve --data "$W/b" --listen 127.0.0.1:11919 --api 127.0.0.1:11991 \
        > "$W/b.log" 2>&1 &
    B=$!; PIDS+=("$B")
    wait_port 11990; wait_port 11991; wait_port 11909
    export MIRRORPOOL_API=http://127.0.0.1:11990
}
