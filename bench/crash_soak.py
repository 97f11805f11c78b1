#!/usr/bin/env python3
"""Crash soak: the crash-test harness of tests/crash for many cycles.

Each cycle runs about a second of concurrent writes (FUA, FLUSH) and triggers (API,
NAME:trigger, in-band, .trigger LU) against a real device, SIGKILLs it at a random
moment, restarts it on the same data directory and checks durability, prefix
consistency, mirror equality and that no generation changed (see
tests/crash/harness.py).  Counts are printed after every cycle and a summary line
at the end; violations are counted, never fatal.

Run from the project root::

    .venv/bin/python bench/crash_soak.py --cycles 200 | tee bench/results/crash_soak-200.txt

Loopback only; the device is started and stopped by PID, and its temporary data
directory is removed at the end unless --keep is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Debian's interpreter first, as the tests do (nbdsh and friends).
os.environ["PATH"] = "/usr/bin:" + os.environ.get("PATH", "")

from tests.crash.harness import CrashHarness, HarnessConfig  # noqa: E402


def _source() -> str:
    """Where the device's code comes from (the server runs the same interpreter path)."""
    import mirrorpool

    where = Path(mirrorpool.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if not commit:
        return f"{where} (not a git checkout)"
    return f"{where} at {commit}" + (" with uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="stop starting new cycles after this long")
    ap.add_argument("--load", type=float, nargs=2, default=(0.4, 1.2), metavar=("MIN", "MAX"),
                    help="seconds of load before the kill")
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--trigger-threads", type=int, default=2)
    ap.add_argument("--size", default="64M", help="LU size (K, M, G suffixes)")
    ap.add_argument("--pool", type=int, default=6)
    ap.add_argument("--examples", type=int, default=3,
                    help="violations of each kind to show at the end")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    ap.add_argument("--snapshot", action="store_true",
                    help="copy the data directory after every kill (post-mortems)")
    args = ap.parse_args(argv)

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    sizes = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    size = int(args.size[:-1]) * sizes[args.size[-1].upper()] if args.size[-1].isalpha() \
        else int(args.size)
    config = HarnessConfig(size=size, pool=args.pool, writers=args.writers,
                           trigger_threads=args.trigger_threads,
                           load_seconds=tuple(args.load), seed=seed,  # type: ignore[arg-type]
                           snapshot=args.snapshot)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mirrorpool-crash-soak-"))
    print(f"crash soak: cycles={args.cycles} seed={seed} size={size} pool={args.pool} "
          f"writers={args.writers} trigger_threads={args.trigger_threads} "
          f"load={args.load[0]}-{args.load[1]}s work_dir={work}", flush=True)
    print(f"host: {platform.node()} {platform.platform()} cpus={os.cpu_count()} "
          f"python={platform.python_version()}", flush=True)
    print(f"mirrorpool: {_source()}", flush=True)
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    harness = CrashHarness(work, config, log=lambda m: print(m, flush=True))
    try:
        harness.start()

        def progress(result) -> None:  # type: ignore[no-untyped-def]
            r = harness.report
            print(f"{result.line()} | total: cycles={r.cycles} "
                  f"violations={r.total_violations} elapsed={r.seconds:.0f}s", flush=True)

        report = harness.run(args.cycles, on_cycle=progress, deadline=deadline)
    finally:
        harness.close()
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if report.cycles < args.cycles:
        print(f"NOTE: ran {report.cycles} of {args.cycles} cycles within the time budget")
    if report.examples:
        print(f"first violations of each kind (up to {args.examples} per kind):")
        for kind in sorted(report.violations):
            shown = [e for e in report.examples if e["kind"] == kind][: args.examples]
            for example in shown:
                print("  " + json.dumps(example, default=str)[:1500])
    print("SUMMARY " + report.summary(), flush=True)
    return 1 if report.total_violations else 0


if __name__ == "__main__":
    sys.exit(main())
