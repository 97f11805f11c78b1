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
source "$(dirname "$0")/two_devices.sh"
N=${N:-120000}
start_devices
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
