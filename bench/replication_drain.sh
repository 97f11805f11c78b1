#!/bin/bash
# The link sender's cost on device A, apart from any host write: N random 4 KiB writes
# are journalled while device B is stopped (SIGSTOP), then B is let go, and A's CPU
# time (utime + stime of all its threads, from /proc) over the drain is divided by N.
#
#   N=60000 bash bench/replication_drain.sh
#
# A runs on CPU 0, B and fio on CPU 1.  A 1 GiB LU of pool 1, an async link with a
# 4 GiB journal.  The drain ends when A's status shows a lag of 0 sequence numbers
# (read every 50 ms, which A's API answers: a small part of the CPU counted).
# Ports 11909/11919 (NBD) and 11990/11991 (API) on 127.0.0.1; servers are stopped by PID.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MP="$ROOT/.venv/bin/mirrorpool"
N=${N:-120000}
W=$(mktemp -d /tmp/replication-drain-XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done; echo "port $1 not up" >&2; exit 1; }
taskset -c 0 "$MP" serve --data "$W/a" --listen 127.0.0.1:11909 --api 127.0.0.1:11990 > "$W/a.log" 2>&1 &
A=$!; PIDS+=("$A")
taskset -c 1 "$MP" serve --data "$W/b" --listen 127.0.0.1:11919 --api 127.0.0.1:11991 > "$W/b.log" 2>&1 &
B=$!; PIDS+=("$B")
wait_port 11990; wait_port 11991; wait_port 11909
export MIRRORPOOL_API=http://127.0.0.1:11990
"$MP" lu create bench --size 1G --pool 1 > /dev/null
"$MP" remote add bench --device http://127.0.0.1:11991 --remote-pool 1 --journal-limit 4G > /dev/null
st() { curl -s "$MIRRORPOOL_API/v1/lus/bench/remote"; }
for _ in $(seq 600); do s=$(st); [[ $s == *'"state":"consistent"'* && $s == *'"lag_seq":0,'* ]] && break; sleep 0.5; done
kill -STOP "$B"
taskset -c 1 fio --name=x --ioengine=nbd --uri=nbd://127.0.0.1:11909/bench --rw=randwrite \
    --bs=4k --iodepth=16 --size=1G --io_size=$((N*4096)) --randrepeat=0 > /dev/null
sleep 1
cpu() { awk '{print $14+$15}' /proc/$A/stat; }
c0=$(cpu); t0=$(date +%s.%N)
kill -CONT "$B"
for _ in $(seq 6000); do s=$(st); [[ $s == *'"lag_seq":0,'* ]] && break; sleep 0.05; done
c1=$(cpu); t1=$(date +%s.%N)
/usr/bin/python3 -c "
import os; t=os.sysconf('SC_CLK_TCK'); c=($c1-$c0)/t; d=$t1-$t0
print(f'drained $N records in {d:.2f}s = {$N/d:,.0f}/s; A used {c:.2f} CPU-s = {c/$N*1e6:.1f} us per record')"
