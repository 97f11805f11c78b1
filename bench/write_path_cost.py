#!/usr/bin/env python3
"""CPU per host write of the data path, in-process: mirrored, and mirrored with a journal.

No sockets, no fio and no other process: one thread calls the export's ``admit``
and ``write`` for random 4 KiB writes, as a connection's thread does, and
``time.thread_time`` gives the CPU per write.  The figures do not move with the
machine's load as the end-to-end benchmarks do, so a change to the write path
can be compared in a few seconds (run it with ``--mirrorpool-src`` of each side).

Cases, each on a fresh LU of ``--size`` (pool 3) in a temporary data directory:

1. **mirrored**: the primary and the active backup.
2. **journalled**: the same LU with a replication journal, as on a replicated
   LU in async mode: each write is numbered, encoded, appended and put on file
   before its data.  The link is never started, so nothing is sent; the
   journal's limit is far above what the run writes.

And the journal's own steps, alone: ``encode`` of a 4 KiB record, then
``append_encoded`` + ``persist`` of it to a scratch journal.

Every write lands on a page written before (the LU is written once first), so
the page cache holds small folios, as after a cache drop.

    .venv/bin/python bench/write_path_cost.py --writes 50000 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--writes", type=int, default=50000, help="writes per measured pass")
    p.add_argument("--repeat", type=int, default=5, help="passes per case (median reported)")
    p.add_argument("--size", type=int, default=1 << 30, help="LU size in bytes (default 1 GiB)")
    p.add_argument("--mirrorpool-src", default=str(REPO / "src"),
                   help="directory holding the mirrorpool package to measure")
    p.add_argument("--tmpdir", default=None, help="where to make the temporary directory")
    args = p.parse_args()
    sys.path.insert(0, args.mirrorpool_src)

    from mirrorpool.device.device import Device
    from mirrorpool.device.exports import PrimaryExport
    from mirrorpool.nbd.codec import Command
    from mirrorpool.nbd.constants import Cmd
    from mirrorpool.replication.journal import Kind, ReplicationJournal, encode
    from mirrorpool.replication.link import CONSISTENT, RemoteConfig, Replicator

    block = 4096
    payload = memoryview(os.urandom(block))
    rng = random.Random(1)
    offsets = [rng.randrange(args.size // block) * block for _ in range(args.writes)]

    system: dict[str, list[float]] = defaultdict(list)  # of which in the kernel
    faults: dict[str, list[float]] = defaultdict(list)  # minor page faults per write

    def passes(export: PrimaryExport, case: str,
               after_pass: Callable[[], None] = lambda: None) -> list[float]:
        """CPU µs per write of each pass; one pass first to warm the pages and the code."""
        out = []
        for i in range(args.repeat + 1):
            # Written back first: a write-back running under a pass (the kernel starts
            # one 30 s after pages were dirtied, or past a share of memory) would cost
            # whichever case it falls on, up to 50 % more.
            os.sync()
            started = time.thread_time()
            before = resource.getrusage(resource.RUSAGE_THREAD)
            for offset in offsets:
                ticket = export.admit(Command(0, Cmd.WRITE, 1, offset, block, block), payload)
                export.write(ticket, payload, offset, False)
            if i:
                out.append((time.thread_time() - started) / len(offsets) * 1e6)
                after = resource.getrusage(resource.RUSAGE_THREAD)
                system[case].append((after.ru_stime - before.ru_stime) / len(offsets) * 1e6)
                faults[case].append((after.ru_minflt - before.ru_minflt) / len(offsets))
            after_pass()
        return out

    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="write-path-cost-", dir=args.tmpdir) as tmp:
        device = Device(os.path.join(tmp, "device"))
        try:
            lu = device.create_lu("lu", args.size, pool=3)
            for offset in range(0, args.size, block):  # every page once, in small folios
                ticket = lu.volume.begin(offset, block)
                lu.volume.write(ticket, payload, offset)
            # the first copy into the active backup, and its cache drop, are over
            while any(m.pending or (m.dropper is not None and m.dropper.is_alive())
                      for m in lu.volume.members):
                time.sleep(0.05)
            export = PrimaryExport(device, lu)
            # Both cases write the same pages of the same LU: they differ by the journal.
            results["mirrored"] = passes(export, "mirrored")
            journal = ReplicationJournal(os.path.join(tmp, "journal"), 1 << 62)
            config = RemoteConfig(lu="lu", device="", nbd="", remote="lu", state=CONSISTENT)
            # never started: records are journalled and persisted, nothing is sent
            replicator = Replicator(config, lu.volume, journal, save=lambda _r: None)
            device.remotes._replicators["lu"] = replicator
            # as a link that keeps up does, so the journal's files do not pile up
            results["journalled"] = passes(export, "journalled",
                                           lambda: journal.trim(journal.last_seq))
            del device.remotes._replicators["lu"]
            journal.close()
        finally:
            device.close()

        scratch = ReplicationJournal(os.path.join(tmp, "scratch"), 1 << 62)
        record = encode(Kind.WRITE, 1, 0, block, payload)
        enc, app = [], []
        for _ in range(args.repeat):
            started = time.thread_time()
            for seq in range(args.writes):
                encode(Kind.WRITE, seq, offsets[seq], block, payload)
            enc.append((time.thread_time() - started) / args.writes * 1e6)
            started = time.thread_time()
            for _ in range(args.writes):
                seq = scratch.last_seq + 1
                scratch.append_encoded(seq, Kind.WRITE, record)
                scratch.persist(seq)
            app.append((time.thread_time() - started) / args.writes * 1e6)
            scratch.trim(scratch.last_seq)
        scratch.close()
        results["journal: encode a 4 KiB record"] = enc
        results["journal: append and persist it"] = app

    revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or "unknown"
    print(f"command: {' '.join(sys.argv)}")
    print(f"checkout: {REPO} at {revision} (the source measured may differ: see below)")
    print(f"mirrorpool source: {args.mirrorpool_src}; {args.writes} writes per pass, "
          f"median of {args.repeat} passes; loadavg {os.getloadavg()[0]:.2f}\n")
    print("| case | CPU µs per write (median) | passes |")
    print("| --- | ---: | --- |")
    for name, values in results.items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {statistics.median(values):.2f} | {runs} |")
    for case in ("mirrored", "journalled"):
        print(f"{case}: of which system time {statistics.median(system[case]):.2f} µs, "
              f"{statistics.median(faults[case]):.3f} minor page faults per write")
    cost = statistics.median(results["journalled"]) - statistics.median(results["mirrored"])
    print(f"\njournalling adds {cost:.2f} µs of CPU per write")


if __name__ == "__main__":
    main()
