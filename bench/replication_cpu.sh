#!/bin/bash
# Where device A's CPU goes per host write, with and without a replication link.
#
#   bash bench/replication_cpu.sh MODE [drop]
#
# MODE: nolink    the LU alone
#       link      async link to device B (B on CPU 1)
#       journal   the link, with B SIGKILLed once caught up: journaling, no sending
# drop: `sync; echo 1 > /proc/sys/vm/drop_caches` (root) before the measured run, so
#       the page cache holds no large folios from the fill and the initial copy.
#
# A and fio run on CPU 0, B on CPU 1.  A 1 GiB LU of pool 3 is filled with 1 MiB
# writes, then fio writes 4 KiB blocks at random, iodepth 16, for 16 s; A's threads'
# utime + stime (from /proc) over 10 s of it are divided by the writes in that time.
# Ports 11909/11919 (NBD) and 11990/11991 (API) on 127.0.0.1; servers are stopped by PID.
set -euo pipefail
MODE=${1:?usage: replication_cpu.sh nolink|link|journal [drop]}
DROP=${2:-}
source "$(dirname "$0")/two_devices.sh"
start_devices
"$MP" lu create bench --size 1G --pool 3 > /dev/null
fio --name=fill --ioengine=nbd --uri=nbd://127.0.0.1:11909/bench --rw=write --bs=1M \
    --iodepth=8 --size=1G > /dev/null
if [ "$MODE" != nolink ]; then
    "$MP" remote add bench --device http://127.0.0.1:11991 --remote-pool 3 > /dev/null
    for _ in $(seq 600); do
        s=$(curl -s "$MIRRORPOOL_API/v1/lus/bench/remote")
        [[ $s == *'"state":"consistent"'* && $s == *'"lag_seq":0,'* ]] && break
        sleep 0.5
    done
fi
[ "$MODE" = journal ] && kill -9 "$B" && sleep 1
if [ "$DROP" = drop ]; then sync; echo 1 > /proc/sys/vm/drop_caches; fi

taskset -c 0 fio --name=x --ioengine=nbd --uri=nbd://127.0.0.1:11909/bench --rw=randwrite \
    --bs=4k --iodepth=16 --size=1G --runtime=16 --time_based --output-format=json \
    --output="$W/fio.json" > /dev/null &
F=$!
sleep 3
/usr/bin/python3 - "$A" 10 > "$W/cpu.txt" <<'PY'
import os, sys, time
pid, span = sys.argv[1], float(sys.argv[2])
def snap():
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            out[tid] = (int(f[11]), int(f[12]))
        except OSError:
            pass
    return out
a = snap(); time.sleep(span); b = snap()
ticks = os.sysconf("SC_CLK_TCK")
user = sum(b[t][0] - a.get(t, (0, 0))[0] for t in b) / ticks / span
system = sum(b[t][1] - a.get(t, (0, 0))[1] for t in b) / ticks / span
print(user, system)
PY
wait "$F"
/usr/bin/python3 - "$W/fio.json" "$(cat "$W/cpu.txt")" "$MODE" "$DROP" <<'PY'
import json, sys
iops = json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"]
user, system = map(float, sys.argv[2].split())
cpu = user + system
print(f"{sys.argv[3]} {sys.argv[4] or 'cached'}: {iops:,.0f} write IOPS, "
      f"A uses {cpu:.2f} CPU = {cpu / iops * 1e6:.1f} us per write "
      f"({user / iops * 1e6:.1f} user, {system / iops * 1e6:.1f} system)")
PY
