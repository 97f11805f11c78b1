#!/usr/bin/env python3
"""Write cost of mirroring: mirrorpool (pool 3) against nbdkit file and a qsd mirror.

Three servers serve the same pre-filled raw file in turn, through the page
cache, loopback only, never two at once:

* mirrorpool, one LU of pool 3 on the file (``lu create --backing``), measured
  once its active backup is in sync, so every write goes to primary and backup;
* ``nbdkit file`` on the file: no mirror, the floor;
* qemu-storage-daemon: the file and a second raw file added with driver file,
  cache.direct=false; ``blockdev-mirror sync=full copy-mode=write-blocking``
  from the first to the second, measured after BLOCK_JOB_READY, the first
  exported writable over NBD (``nbd-server-start`` + ``block-export-add``).

Workloads (fio --ioengine=nbd): random write 4 KiB at iodepth 1 and 16,
sequential write 1 MiB at iodepth 8.  Each (server, workload) is run
``--repeat`` times with the servers' order rotated each repeat; medians are
reported with the ratios mirrorpool/nbdkit and mirrorpool/qsd.

Split latency, per repeat, idle and under a 4 KiB iodepth-16 random write
load: mirrorpool's ``split_ms`` from the trigger's answer (trigger received to
generation readable) and the API round trip; qsd's ``block-job-cancel`` on the
ready mirror, timed from the command to the job's end event (on a ready mirror
QEMU ends the job with BLOCK_JOB_COMPLETED: the target is then a point-in-time
copy), which is its closest thing to a split.

    .venv/bin/python bench/mirror_compare.py --runtime 10 --repeat 5
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fio_compare import (
    MIB,
    FioRunner,
    NbdkitServer,
    Sample,
    Server,
    Workload,
    _on_sigterm,
    fill_random,
    fmt_value,
    medians,
    parse_size,
    progress,
    render_table,
    rotations,
)
from mirrorbench import (
    Fio,
    MirroredMirrorpool,
    QsdMirrorServer,
    add_source_args,
    check_tools,
    dump_json,
    exit_note,
    header,
    loadavg,
    median,
    sync_files,
)

SERVERS = ("mirrorpool", "nbdkit", "qsd")
WORKLOADS: tuple[Workload, ...] = (
    Workload("rand-write-4k-qd1", "randwrite", 4096, 1),
    Workload("rand-write-4k-qd16", "randwrite", 4096, 16),
    Workload("seq-write-1m-qd8", "write", MIB, 8),
)
LOAD = Workload("rand-write-4k-qd16", "randwrite", 4096, 16)  # the load under which splits run


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="mirrorpool (pool 3) against nbdkit file and a qemu-storage-daemon "
                    "write-blocking mirror, with fio; plus split latency.",
        epilog="workloads: " + ", ".join(w.name for w in WORKLOADS),
    )
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio job (time_based)")
    p.add_argument("--size", type=parse_size, default=parse_size("1G"),
                   help="size of the file and of fio's region (default 1G)")
    p.add_argument("--repeat", type=int, default=3, help="runs per server and workload")
    p.add_argument("--pool", type=int, default=3, help="mirrorpool pool size (default 3)")
    p.add_argument("--workloads", default="*", help="comma-separated names or glob patterns")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"comma-separated subset of {','.join(SERVERS)}")
    p.add_argument("--split-load-runtime", type=int, default=4,
                   help="seconds of fio load during which one split is taken (0: no loaded "
                        "split)")
    add_source_args(p)
    args = p.parse_args(argv)
    if args.runtime < 1 or args.repeat < 1:
        p.error("--runtime and --repeat must be at least 1")
    patterns = [x.strip() for x in args.workloads.split(",") if x.strip()]
    args.workload_list = [w for w in WORKLOADS
                          if any(fnmatch.fnmatch(w.name, pat) for pat in patterns)]
    if not args.workload_list:
        p.error(f"--workloads {args.workloads!r} matches nothing")
    chosen = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not chosen or any(s not in SERVERS for s in chosen):
        p.error(f"--servers: choose from {', '.join(SERVERS)}")
    args.server_list = [s for s in SERVERS if s in chosen]
    check_tools(p, args, [args.fio, "nbdkit", "qemu-storage-daemon"])
    return args


def split_under_load(server: Server, fio: Fio, seconds: int, take) -> Any:  # type: ignore[no-untyped-def]
    """Run the LOAD workload for ``seconds`` and call ``take()`` halfway through."""
    fio.start(f"split-load-{server.name}", server.uri,
              [f"--rw={LOAD.rw}", f"--bs={LOAD.bs}", f"--iodepth={LOAD.iodepth}",
               f"--size={server.size}", f"--runtime={seconds}", "--time_based"])
    time.sleep(seconds / 2)
    if not fio.running():
        fio.wait(10)
        raise RuntimeError("the load ended before the split")
    result = take()
    fio.wait(seconds * 4 + 60)
    return result


def measure_splits(server: Server, fio: Fio, load_s: int, repeat: int,
                   out: list[dict[str, Any]]) -> None:
    if isinstance(server, MirroredMirrorpool):
        def take() -> dict[str, Any]:
            answer, rtt = server.trigger()
            return {"split_ms": answer["generations"][0]["split_ms"], "rtt_ms": rtt * 1000}

        def settle() -> None:
            server.wait_in_sync(600)
    elif isinstance(server, QsdMirrorServer):
        def take() -> dict[str, Any]:
            secs, event = server.split()
            return {"split_ms": secs * 1000, "event": event}

        def settle() -> None:
            server.start_mirror()
    else:
        return
    sync_files(server.files())
    row = {"repeat": repeat, "server": server.name, "load": "idle", "loadavg": loadavg(), **take()}
    out.append(row)
    progress(f"  split (idle)        {row['split_ms']:8.3f} ms"
             + (f"  (API round trip {row['rtt_ms']:.1f} ms)" if "rtt_ms" in row else
                f"  ({row.get('event')})"))
    if load_s <= 0:
        return
    settle()
    sync_files(server.files())
    res = split_under_load(server, fio, load_s, take)
    row = {"repeat": repeat, "server": server.name, "load": LOAD.name, "loadavg": loadavg(),
           **res}
    out.append(row)
    progress(f"  split (under load)  {row['split_ms']:8.3f} ms"
             + (f"  (API round trip {row['rtt_ms']:.1f} ms)" if "rtt_ms" in row else
                f"  ({row.get('event')})"))


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def report(samples: list[Sample], servers: Sequence[str], workloads: Sequence[Workload],
           med: dict[str, dict[str, dict[str, float]]], splits: list[dict[str, Any]],
           ready: dict[str, list[float]]) -> str:
    def get(w: str, s: str, key: str) -> float | None:
        return med.get(w, {}).get(s, {}).get(key)

    head = ["workload", "unit", *servers, "mp/nbdkit", "mp/qsd", *(f"p99µs {s}" for s in servers)]
    rows = [head]
    for w in workloads:
        rows.append([
            w.name, w.unit, *(fmt_value(get(w.name, s, "value"), w.unit) for s in servers),
            ratio(get(w.name, "mirrorpool", "value"), get(w.name, "nbdkit", "value")),
            ratio(get(w.name, "mirrorpool", "value"), get(w.name, "qsd", "value")),
            *(fmt_value(get(w.name, s, "p99_us"), "IOPS") for s in servers),
        ])
    text = render_table(rows, right=set(range(2, len(head))))
    text += ("\n\nmedian of the repeats; MiB/s for 1 MiB blocks, IOPS for 4 KiB blocks; p99 is "
             "fio's\ncompletion-latency 99th percentile; mp = mirrorpool (pool 3, backup in "
             "sync), qsd =\nqemu-storage-daemon with a write-blocking mirror job (ready).\n")

    raw = [["workload", "server", "runs (value, in repeat order)", "p99 µs per run"]]
    for w in workloads:
        for s in servers:
            mine = sorted((x for x in samples if x.server == s and x.workload == w.name),
                          key=lambda x: x.repeat)
            if mine:
                raw.append([w.name, s, ", ".join(fmt_value(x.value, x.unit) for x in mine),
                            ", ".join(f"{x.p99_us:,.0f}" for x in mine)])
    text += f"\nEvery run:\n{render_table(raw, right=set())}\n"

    if splits:
        srows = [["split", "load", "median ms", "max ms", "runs (ms, in repeat order)",
                  "API round trip ms (median)"]]
        for s in ("mirrorpool", "qsd"):
            for load in ("idle", LOAD.name):
                mine = [x for x in splits if x["server"] == s and x["load"] == load]
                if not mine:
                    continue
                what = "mirrorpool split_ms" if s == "mirrorpool" else \
                    "qsd block-job-cancel→event"
                vals = [x["split_ms"] for x in mine]
                rtts = [x["rtt_ms"] for x in mine if "rtt_ms" in x]
                srows.append([what, load, f"{median(vals):.3f}", f"{max(vals):.3f}",
                              ", ".join(f"{v:.3f}" for v in vals),
                              f"{median(rtts):.1f}" if rtts else "-"])
        events = sorted({x["event"] for x in splits if "event" in x})
        text += f"\nSplit latency:\n{render_table(srows, right={2, 3})}\n"
        if events:
            text += f"(qsd's job ended with {', '.join(events)} every time)\n"
    if ready:
        text += "\nTime to a full mirror of the pre-filled file at start (s, per start): " + \
            "; ".join(f"{k} {', '.join(f'{v:.2f}' for v in vs)}" for k, vs in ready.items())
        text += "\n(mirrorpool: 'active backup chosen' → 'backup in sync' in its log; qsd: " \
                "blockdev-mirror → BLOCK_JOB_READY)\n"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mirror-compare-", dir=args.tmpdir))
    servers: dict[str, Server] = {}
    runner: FioRunner | None = None
    fio: Fio | None = None
    samples: list[Sample] = []
    splits: list[dict[str, Any]] = []
    ready: dict[str, list[float]] = {}
    try:
        backing = tmp / "backing.img"
        info, launcher, mp_env, digest = header(command, args, tmp, {
            "backing file": f"{backing} ({args.size} bytes of random data, page cache for "
                            "every server)",
            "config": f"runtime {args.runtime}s per job, repeat {args.repeat}, servers "
                      f"{', '.join(args.server_list)}, mirrorpool pool {args.pool}, args "
                      f"{args.mirrorpool_args or '(none)'}, split load "
                      f"{args.split_load_runtime}s",
        })
        progress(f"filling {backing} with {args.size >> 20} MiB of random data")
        fill_random(backing, args.size)
        common = {"backing": backing, "size": args.size, "workdir": tmp}
        every: dict[str, Server] = {
            "mirrorpool": MirroredMirrorpool(name="mirrorpool", launcher=launcher, env=mp_env,
                                             extra_args=shlex.split(args.mirrorpool_args),
                                             pool=args.pool, **common),
            "nbdkit": NbdkitServer(name="nbdkit", **common),
            "qsd": QsdMirrorServer(name="qsd", **common),
        }
        servers = {n: every[n] for n in args.server_list}
        runner = FioRunner(args.fio, args.size, args.runtime, tmp)
        fio = Fio(args.fio, tmp)

        for repeat, order in rotations(args.server_list, args.repeat):
            for name in order:
                server = servers[name]
                t0 = time.monotonic()
                server.start()
                if isinstance(server, MirroredMirrorpool) and server.sync_s:
                    ready.setdefault(name, []).append(server.sync_s[-1])
                if isinstance(server, QsdMirrorServer):
                    ready.setdefault(name, []).append(server.ready_s[-1])
                pid = server.proc.pid if server.proc else "?"
                progress(f"repeat {repeat}/{args.repeat}: {name} pid {pid} at {server.uri} "
                         f"(ready in {time.monotonic() - t0:.1f}s, loadavg {loadavg()})")
                try:
                    for w in args.workload_list:
                        sync_files(server.files() if hasattr(server, "files") else [backing])
                        la = loadavg()
                        res = runner.run(server, w)
                        server.check_alive()
                        if isinstance(server, MirroredMirrorpool):
                            state = server.mirror()["active_state"]
                            if state != "in-sync":
                                progress(f"  note: mirror {state} after {w.name}")
                        if isinstance(server, QsdMirrorServer) and server.qmp is not None:
                            jobs = server.qmp.command("query-block-jobs")
                            if not jobs or not jobs[0].get("ready"):
                                raise RuntimeError(f"qsd mirror job not ready: {jobs}")
                        value = res["mib_s"] if w.bandwidth else res["iops"]
                        samples.append(Sample(repeat=repeat, server=name, workload=w.name,
                                              value=value, unit=w.unit, **res))
                        progress(f"  {w.name:<20} {fmt_value(value, w.unit):>10} {w.unit:<5}"
                                 f"  p99 {res['p99_us']:,.0f} µs  (loadavg before {la})")
                    measure_splits(server, fio, args.split_load_runtime, repeat, splits)
                finally:
                    server.stop()
                sync_files([backing])

        med = medians(samples, args.server_list, args.workload_list)
        print(report(samples, args.server_list, args.workload_list, med, splits, ready))
        exit_note(args.mirrorpool_src, digest)
        info["loadavg at end"] = loadavg()
        dump_json(args.json_out, {
            "command": command, "machine": info, "mirrorpool_source_sha256": digest,
            "config": {"runtime": args.runtime, "size": args.size, "repeat": args.repeat,
                       "pool": args.pool, "servers": args.server_list,
                       "workloads": [asdict(w) for w in args.workload_list],
                       "split_load_runtime": args.split_load_runtime,
                       "mirrorpool_args": args.mirrorpool_args},
            "samples": [asdict(s) for s in samples], "medians": med, "splits": splits,
            "ready_seconds": ready,
        })
        return 0
    finally:
        if runner is not None:
            runner.stop()
        if fio is not None:
            fio.stop()
        for server in servers.values():
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(tmp):
            progress(f"could not remove {tmp}")


if __name__ == "__main__":
    sys.exit(main())
