#!/usr/bin/env python3
"""Recovery cost: SIGKILL a device under fio random writes, restart it, measure the recovery.

A device serves one LU (default 4 GiB, pool 3).  fio's nbd engine writes 4 KiB
blocks at random offsets at queue depth 16; after ``--kill-after`` seconds the
device is killed (SIGKILL, by PID) while fio is still writing, then restarted on
the same data directory.  Reported for each round:

* bytes resynced at start-up: ``bytes_to_resync`` of the device's log line
  "recovered after an unclean stop", and the active backup's ``sync.chunks_total``
  from ``GET /v1/status`` (times the device's chunk size), as a share of the LU
  (target: under 1 %);
* restart to listening (both ports accept), to serving (an NBD client connects and
  reads the LU), and to in-sync (``mirror.active_state`` is "in-sync").

Run from the project root::

    .venv/bin/python bench/recovery_cost.py --repeat 3 --output bench/results/recovery_cost

Loopback only; the device and fio are stopped by PID, the temporary data directory
is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["PATH"] = "/usr/bin:" + os.environ.get("PATH", "")

from tests.helpers.processes import DeviceProcess, stop_pid  # noqa: E402

from mirrorpool.mirror.changes import CHUNK  # noqa: E402
from mirrorpool.nbd.client import NbdClient, NbdError  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
LU = "recovery"


def mirror(dev: DeviceProcess) -> dict:
    status, body = dev.request("GET", "/v1/status")
    if status != 200:
        raise RuntimeError(f"GET /v1/status answered {status}: {body}")
    for lu in body["lus"]:  # type: ignore[index]
        if lu["name"] == LU:
            return lu["mirror"] or {}
    raise RuntimeError(f"LU {LU} missing from /v1/status")


def wait_in_sync(dev: DeviceProcess, timeout: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if mirror(dev).get("active_state") == "in-sync":
            return time.monotonic()
        time.sleep(0.01)
    return None


def run_fio(uri: str, size: int, runtime: float, out: Path) -> subprocess.Popen:
    args = ["fio", "--name=recovery", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=4k", "--iodepth=16", "--time_based", f"--runtime={int(runtime)}",
            f"--size={size}", "--output-format=json", f"--output={out}"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=out.parent)


def fio_writes(path: Path) -> dict:
    try:
        text = path.read_text()
        job = json.loads(text[text.index("{"):])["jobs"][0]
        return {"io_bytes": job["write"]["io_bytes"], "iops": round(job["write"]["iops"])}
    except (OSError, ValueError, KeyError, IndexError):
        return {}


def one_round(dev: DeviceProcess, size: int, kill_after: float, work: Path, n: int,
              trigger_interval: float) -> dict:
    if wait_in_sync(dev, 600) is None:
        raise RuntimeError("the active backup did not get in sync before the round")
    fio_out = work / f"fio-{n}.json"
    fio = run_fio(dev.uri(LU), size, kill_after + 60, fio_out)
    started = time.monotonic()
    triggers = 0
    while time.monotonic() - started < kill_after:
        if fio.poll() is not None:
            raise RuntimeError(f"fio ended early: {fio.stderr.read().decode()[-2000:]}")
        if trigger_interval:
            dev.request("POST", f"/v1/lus/{LU}/trigger", {"label": f"round{n}-{triggers}"})
            triggers += 1
            time.sleep(trigger_interval)
        else:
            time.sleep(0.05)
    assert dev.proc is not None
    dev.stop(signal.SIGKILL)  # os.kill(pid, SIGKILL)
    killed = time.monotonic()
    try:
        fio.wait(60)
    except subprocess.TimeoutExpired:
        stop_pid(fio, signal.SIGKILL)
    log_offset = dev.log_path.stat().st_size if dev.log_path else 0

    t0 = time.monotonic()
    dev.start()
    t_listen = time.monotonic()
    t_serving = None
    deadline = t0 + 120
    while time.monotonic() < deadline:
        try:
            with NbdClient(dev.uri(LU), timeout=30) as client:
                client.pread(4096, 0)
            t_serving = time.monotonic()
            break
        except (OSError, NbdError):
            time.sleep(0.01)
    first = mirror(dev)
    t_in_sync = wait_in_sync(dev, 1800)
    text = dev.log_path.read_bytes()[log_offset:].decode(errors="replace") if dev.log_path \
        else ""
    m = re.search(r"recovered after an unclean stop .*?bytes_to_resync=(\d+)", text)
    logged = int(m.group(1)) if m else None
    m2 = re.search(r"recovered after an unclean stop .*?chunks_marked_changed=(\d+)", text)
    sync = first.get("sync") or {}
    status_bytes = sync.get("chunks_total", 0) * CHUNK
    return {
        "round": n,
        "load_seconds": round(killed - started, 2),
        "triggers_during_load": triggers,
        "fio": fio_writes(fio_out),
        "bytes_to_resync_log": logged,
        "bytes_to_resync_status": status_bytes,
        "resync_percent_of_lu": round(100.0 * (logged or status_bytes) / size, 3),
        "chunks_marked_changed": int(m2.group(1)) if m2 else None,
        "state_at_first_status": first.get("active_state"),
        "restart_to_listening_s": round(t_listen - t0, 3),
        "restart_to_serving_s": round(t_serving - t0, 3) if t_serving else None,
        "restart_to_in_sync_s": round(t_in_sync - t0, 3) if t_in_sync else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4 * GiB, help="LU size in bytes")
    ap.add_argument("--pool", type=int, default=3)
    ap.add_argument("--kill-after", type=float, default=10.0, help="seconds of fio load")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--trigger-interval", type=float, default=0.0,
                    help="also fire an API trigger every this many seconds during the load")
    ap.add_argument("--output", type=Path, default=None,
                    help="write OUTPUT.txt and OUTPUT.json as well")
    args = ap.parse_args(argv)
    if shutil.which("fio") is None:
        print("fio is not installed", file=sys.stderr)
        return 2

    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    work = Path(tempfile.mkdtemp(prefix="mirrorpool-recovery-"))
    dev = DeviceProcess(data_dir=work / "data")
    rounds = []
    say(f"recovery cost: LU {args.size / GiB:g} GiB pool {args.pool}, fio randwrite 4k "
        f"iodepth 16, SIGKILL after {args.kill_after:g}s, {args.repeat} round(s)"
        + (f", API trigger every {args.trigger_interval:g}s" if args.trigger_interval else ""))
    say(f"host: {platform.node()} {platform.platform()} cpus={os.cpu_count()}")
    try:
        dev.start()
        dev.create_lu(str(args.size), pool=args.pool, name=LU)
        for n in range(1, args.repeat + 1):
            r = one_round(dev, args.size, args.kill_after, work, n, args.trigger_interval)
            rounds.append(r)
            resync = r["bytes_to_resync_log"]
            say(f"round {n}: fio {r['fio'].get('iops', '?')} IOPS for {r['load_seconds']}s; "
                f"resync at start {resync / MiB if resync is not None else float('nan'):.2f} "
                f"MiB (log) / {r['bytes_to_resync_status'] / MiB:.2f} MiB (status) = "
                f"{r['resync_percent_of_lu']}% of the LU (chunks marked changed by recovery: "
                f"{r['chunks_marked_changed']}); restart to listening "
                f"{r['restart_to_listening_s']}s, to serving {r['restart_to_serving_s']}s, "
                f"to in-sync {r['restart_to_in_sync_s']}s")
    finally:
        if dev.proc is not None and dev.proc.poll() is None:
            dev.stop()
        shutil.rmtree(work, ignore_errors=True)

    def med(key: str) -> float | None:
        values = [r[key] for r in rounds if r[key] is not None]
        return round(statistics.median(values), 3) if values else None

    worst = max(r["resync_percent_of_lu"] for r in rounds)
    say(f"SUMMARY rounds={len(rounds)} resync_percent_of_lu max={worst} "
        f"(target < 1%: {'met' if worst < 1 else 'NOT met'}) "
        f"median restart_to_serving={med('restart_to_serving_s')}s "
        f"median restart_to_in_sync={med('restart_to_in_sync_s')}s")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        args.output.with_suffix(".json").write_text(json.dumps(
            {"size": args.size, "pool": args.pool, "kill_after": args.kill_after,
             "trigger_interval": args.trigger_interval, "rounds": rounds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
