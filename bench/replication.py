#!/usr/bin/env python3
"""Replication to a remote device: host cost, lag, catch-up after a link cut, resync.

Two mirrorpool devices on loopback, A (the source) and B (the remote device).
A serves LU ``bench`` (an internal sparse file, pool 3), filled with fio first.
Each repeat, with fresh devices:

1. **no link**: fio 4 KiB random writes, iodepth 16, on A's LU.
2. **async**: the same with the LU replicated to B (`remote add --mode async`);
   the link's lag (sequence numbers, seconds, journal bytes) is sampled every
   0.25 s, and the time from fio's end to caught-up is measured.
3. **sync**: the same with a sync link (to a second LU on B).
4. **catch-up**: B is SIGKILLed while fio writes on A for ``--cut`` seconds, then
   restarted; the journal bytes written meanwhile over the time to catch up
   give the catch-up rate.
5. **resync**: with a journal limit far below the change, B is killed, 1 % of the
   LU is written in 64 KiB blocks (the journal overflows and A falls back to
   changed-block tracking), B is restarted; the bytes A sends to bring B back
   are reported as a share of the LU (target: under 2 %).

Run from the project root::

    .venv/bin/python bench/replication.py --runtime 10 --repeat 3

Servers are stopped by PID; the temporary directory is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fio_compare import LU_NAME, MirrorpoolServer, free_port, wait_for_port  # noqa: E402
from mirrorbench import (  # noqa: E402
    Api,
    Fio,
    add_source_args,
    check_tools,
    dump_json,
    exit_note,
    header,
    loadavg,
    percentile_of,
    write_side,
)

MIB = 1 << 20


@dataclass
class Device(MirrorpoolServer):
    """A device on fixed ports and one data directory, so it can be killed and restarted."""

    data: Path | None = None
    cpus: str | None = None  # taskset CPU list, with --pin

    def command(self) -> list[str]:
        assert self.data is not None
        pin = ["taskset", "-c", self.cpus] if self.cpus else []
        return [*pin, *self.launcher, "serve", "--data", str(self.data),
                "--listen", f"127.0.0.1:{self.port}", "--api", f"127.0.0.1:{self.api_port}"]

    def start(self) -> None:
        self.starts += 1
        if not self.port:
            self.port, self.api_port = free_port(), free_port()
        self._spawn(self.command(), self.env)
        assert self.proc is not None
        wait_for_port(self.api_port, self.proc, f"{self.name} (control API)")
        wait_for_port(self.port, self.proc, f"{self.name} (NBD)")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def cli(self, *args: str) -> str:
        env = {**(self.env or {}), "MIRRORPOOL_API": self.api_url}
        out = subprocess.run([*self.launcher, *args], capture_output=True, text=True, env=env,
                             cwd=self.workdir, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"mirrorpool {shlex.join(args)}: {out.stderr or out.stdout}")
        return out.stdout


def status(api: Api, lu: str = LU_NAME) -> dict[str, Any]:
    return api.get(f"/v1/lus/{lu}/remote")


def caught_up(s: dict[str, Any]) -> bool:
    return (s["state"] == "consistent" and s["connected"] and s["lag_seq"] == 0
            and s["journal_used"] == 0)


def wait_caught_up(api: Api, timeout: float, lu: str = LU_NAME) -> float:
    t0 = time.monotonic()
    while not caught_up(status(api, lu)):
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"link of {lu} not caught up after {timeout:.0f}s: "
                               f"{status(api, lu)}")
        time.sleep(0.02)
    return time.monotonic() - t0


def fio_options(runtime: int, size: int) -> list[str]:
    return ["--rw=randwrite", "--bs=4096", "--iodepth=16", f"--size={size}",
            f"--runtime={runtime}", "--time_based", "--percentile_list=50:99:99.9"]


def run_fio(fio: Fio, name: str, uri: str, runtime: int, size: int,
            sample: Any = None) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    stop = threading.Event()

    def sampler() -> None:
        api = Api(sample)
        while not stop.wait(0.25):
            with contextlib.suppress(Exception):  # sampling must not end the run
                samples.append(status(api))
        api.close()

    thread = threading.Thread(target=sampler) if sample else None
    if thread:
        thread.start()
    try:
        side = write_side(fio.run(name, uri, fio_options(runtime, size), runtime + 120))
    finally:
        stop.set()
        if thread:
            thread.join()
    row = {"iops": float(side["iops"]), "p99_us": percentile_of(side, 99.0),
           "p999_us": percentile_of(side, 99.9)}
    if samples:
        lag = [s["lag_seq"] or 0 for s in samples]
        row.update(lag_seq_median=statistics.median(lag), lag_seq_max=max(lag),
                   lag_s_max=max(s["lag_seconds"] for s in samples),
                   journal_max_mib=max(s["journal_used"] for s in samples) / MIB)
    return row


def one_repeat(args: argparse.Namespace, tmp: Path, launcher: list[str],
               env: dict[str, str], rep: int, fio: Fio) -> dict[str, Any]:
    size = args.size * MIB
    a = Device("A", tmp / "unused", size, tmp, launcher=launcher, env=env,
               data=tmp / f"a-{rep}", cpus="0" if args.pin else None)
    b = Device("B", tmp / "unused", size, tmp, launcher=launcher, env=env,
               data=tmp / f"b-{rep}", cpus="1" if args.pin else None)
    out: dict[str, Any] = {"repeat": rep}
    try:
        a.start()
        b.start()
        a.cli("lu", "create", LU_NAME, "--size", str(size), "--pool", "3")
        api = Api(a.api_port)
        uri = f"nbd://127.0.0.1:{a.port}/{LU_NAME}"
        fio.run("fill", uri, ["--rw=write", "--bs=1M", "--iodepth=8", f"--size={size}"], 600)
        api.post(f"/v1/lus/{LU_NAME}/trigger", {"label": "settle"})
        time.sleep(1)

        out["no_link"] = run_fio(fio, "no-link", uri, args.runtime, size)
        print(f"[{time.strftime('%H:%M:%S')}] repeat {rep}: no link  {out['no_link']}",
              flush=True)

        t0 = time.monotonic()
        # a journal that holds the whole cut below, so the catch-up replays it
        a.cli("remote", "add", LU_NAME, "--device", b.api_url, "--remote-pool", "3",
              "--journal-limit", f"{args.journal_limit}M")
        wait_caught_up(api, 900)
        out["initial_copy_s"] = time.monotonic() - t0
        out["async"] = run_fio(fio, "async", uri, args.runtime, size, sample=a.api_port)
        out["async"]["catch_up_after_s"] = wait_caught_up(api, 600)
        print(f"[{time.strftime('%H:%M:%S')}] repeat {rep}: async    {out['async']}",
              flush=True)

        # catch-up after a cut: B down while fio writes on A
        b.kill()
        used0 = status(api)["journal_used"]
        fio.run("cut", uri, fio_options(args.cut, size), args.cut + 120)
        cut = status(api)
        backlog = cut["journal_used"] - used0
        t0 = time.monotonic()
        b.start()
        took = wait_caught_up(api, 900)
        out["catch_up"] = {"cut_s": args.cut, "backlog_mib": backlog / MIB, "seconds": took,
                           "mib_per_s": backlog / MIB / took if took else float("nan"),
                           "state_after_cut": cut["state"]}
        print(f"[{time.strftime('%H:%M:%S')}] repeat {rep}: catch-up {out['catch_up']}",
              flush=True)

        # resync of an inconsistent copy after 1 % changed
        a.cli("remote", "remove", LU_NAME)
        a.cli("remote", "add", LU_NAME, "--device", b.api_url, "--journal-limit", "2M")
        wait_caught_up(api, 900)
        b.kill()
        change = size // 100
        fio.run("change", uri, ["--rw=randwrite", "--bs=64k", "--iodepth=8",
                                f"--size={size}", f"--io_size={change}",
                                "--randrepeat=0", "--norandommap=0"], 600)
        s = status(api)
        sent0 = s["sent_bytes"]
        b.start()
        took = wait_caught_up(api, 900)
        sent = status(api)["sent_bytes"] - sent0
        out["resync"] = {"changed_mib": change / MIB, "state_before": s["state"],
                         "dirty_mib": s["dirty_bytes"] / MIB, "sent_mib": sent / MIB,
                         "sent_pct_of_lu": 100.0 * sent / size, "seconds": took}
        print(f"[{time.strftime('%H:%M:%S')}] repeat {rep}: resync   {out['resync']}",
              flush=True)

        # sync mode, to a second remote LU
        a.cli("remote", "remove", LU_NAME)
        a.cli("remote", "add", LU_NAME, "--device", b.api_url, "--remote-name", "bench-sync",
              "--remote-pool", "1", "--mode", "sync")
        wait_caught_up(api, 900)
        out["sync"] = run_fio(fio, "sync", uri, args.runtime, size, sample=a.api_port)
        print(f"[{time.strftime('%H:%M:%S')}] repeat {rep}: sync     {out['sync']}",
              flush=True)
        api.close()
    finally:
        fio.stop()
        a.stop()
        b.stop()
    return out


def table(rows: list[dict[str, Any]]) -> str:
    def med(path: tuple[str, str]) -> float:
        return statistics.median(r[path[0]][path[1]] for r in rows)

    no_link = med(("no_link", "iops"))
    lines = [
        "| figure (median of repeats) | value | ratio | target |",
        "| --- | ---: | ---: | --- |",
        f"| write IOPS, no link | {no_link:,.0f} | | |",
        f"| write IOPS, async link | {med(('async', 'iops')):,.0f} | "
        f"{med(('async', 'iops')) / no_link:.2f} | ≥ 0.8 |",
        f"| write IOPS, sync link | {med(('sync', 'iops')):,.0f} | "
        f"{med(('sync', 'iops')) / no_link:.2f} | (report) |",
        f"| p99 µs no link / async / sync | {med(('no_link', 'p99_us')):,.0f} / "
        f"{med(('async', 'p99_us')):,.0f} / {med(('sync', 'p99_us')):,.0f} | | |",
        f"| async lag under load: seq median / max, seconds max | "
        f"{med(('async', 'lag_seq_median')):,.0f} / {med(('async', 'lag_seq_max')):,.0f}, "
        f"{med(('async', 'lag_s_max')):.2f} s | | |",
        f"| async: caught up after fio stopped | {med(('async', 'catch_up_after_s')):.2f} s | | |",
        f"| catch-up after a {rows[0]['catch_up']['cut_s']} s cut "
        f"({', '.join(sorted({r['catch_up']['state_after_cut'] for r in rows}))} "
        "after it): backlog, time, rate | "
        f"{med(('catch_up', 'backlog_mib')):.0f} MiB, {med(('catch_up', 'seconds')):.1f} s, "
        f"{med(('catch_up', 'mib_per_s')):.0f} MiB/s | | |",
        f"| resync after 1 % changed: bytes sent / LU | "
        f"{med(('resync', 'sent_mib')):.1f} MiB = {med(('resync', 'sent_pct_of_lu')):.2f} % "
        f"| | < 2 % |",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--size", type=int, default=1024, help="LU size in MiB")
    p.add_argument("--cut", type=int, default=30, help="seconds the link is cut")
    p.add_argument("--journal-limit", type=int, default=4096,
                   help="MiB of replication journal for the async link and the cut")
    p.add_argument("--pin", action="store_true",
                   help="A and fio on CPU 0, B on CPU 1: B as on a machine of its own, "
                        "so the ratios show the cost to A's host path alone")
    add_source_args(p)
    args = p.parse_args()
    check_tools(p, args, [args.fio])
    with tempfile.TemporaryDirectory(prefix="replication-bench-", dir=args.tmpdir) as d:
        tmp = Path(d)
        command = shlex.join(["bench/replication.py", *sys.argv[1:]])
        _, launcher, env, digest = header(command, args, tmp, {
            "config": f"LU {args.size} MiB pool 3 on A; fio randwrite 4 KiB iodepth 16, "
                      f"{args.runtime}s per run; link cut {args.cut}s"
                      + ("; pinned: A and fio on CPU 0, B on CPU 1" if args.pin else "")})
        fio = Fio(args.fio, tmp, ["taskset", "-c", "0"] if args.pin else [])
        rows = []
        for rep in range(1, args.repeat + 1):
            print(f"[{time.strftime('%H:%M:%S')}] repeat {rep}/{args.repeat} "
                  f"(loadavg {loadavg()})", flush=True)
            rows.append(one_repeat(args, tmp, launcher, env, rep, fio))
        print()
        print(table(rows))
        dump_json(args.json_out, {"rows": rows})
        exit_note(args.mirrorpool_src, digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
