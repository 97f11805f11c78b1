#!/usr/bin/env python3
"""What frequent triggers cost the host: write latency with and without them.

One mirrored LU (pool 3) on a pre-filled file, served by mirrorpool through
the page cache, loopback only.  fio writes 4 KiB blocks at random, iodepth 16,
for ``--runtime`` seconds, twice per repeat: once alone, once while a thread
POSTs ``/v1/lus/NAME/trigger`` (or, with ``--mechanism in-band``, sends the NBD
TRIGGER command) every ``--interval`` seconds (each trigger
recycles the oldest generation, so pool 3 never runs out).  The two modes
alternate which goes first from one repeat to the next, and every repeat
starts a fresh server whose members all hold data (pool-1 warm-up triggers,
each waited out until the backup is in sync).  Before each run the pool is
settled: ``--pool`` triggers, each waited out, so every member is as new as
the data and a run never inherits the previous run's writes as a backlog.

Reported: fio's completion latency percentiles (50, 99, 99.9) and IOPS with
and without triggers, the ratio of the p99.9s, and the distribution of
``split_ms`` (trigger received → generation readable, from the answers) over
all triggers of a run; medians over the repeats.  Targets: p99.9 ratio ≤ 1.1
(over 1.5 is not done), split p99 < 1 ms (over 5 ms is not done).

    .venv/bin/python bench/trigger_load.py --runtime 20 --repeat 3
"""

from __future__ import annotations

import argparse
import bisect
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fio_compare import LU_NAME, MIB, _on_sigterm, fill_random, parse_size, progress, render_table
from mirrorbench import (
    Api,
    ApiError,
    Fio,
    MirroredMirrorpool,
    add_source_args,
    check_tools,
    dump_json,
    exit_note,
    header,
    loadavg,
    median,
    pct,
    percentile_of,
    sync_files,
    tracking_chunk,
    write_side,
)
from mirrorpool.nbd.client import NbdClient, NbdError
from mirrorpool.nbd.constants import TRIGGER_CONTEXT

MODES = ("no-triggers", "triggers", "triggers-other-lu", "idle-triggers")
OTHER_LU = "idle"  # a second LU of the same device that nothing writes to
NO_SUCH_LU = "no-such-lu"  # --mechanism api-noop names it
TIMELINE_BIN_MS = 5
RATIO_AIM, RATIO_LIMIT = 1.1, 1.5
SPLIT_AIM_MS, SPLIT_LIMIT_MS = 1.0, 5.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fio write latency on a mirrored LU with and "
                                            "without a trigger every 100 ms.")
    p.add_argument("--runtime", type=int, default=20, help="seconds per fio run")
    p.add_argument("--size", type=parse_size, default=parse_size("1G"), help="LU size (1G)")
    p.add_argument("--repeat", type=int, default=3, help="repeats; medians are reported")
    p.add_argument("--pool", type=int, default=3, help="pool size (default 3)")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between triggers")
    p.add_argument("--mechanism", choices=("api", "in-band", "api-noop"), default="api",
                   help="how triggers are sent: POST to the control API (default), or the NBD "
                        "TRIGGER command on one NBD connection to the LU kept open for the run "
                        "(the project's client, as `mirrorpool trigger --in-band` sends it); "
                        "api-noop POSTs a trigger naming an LU that does not exist, answered "
                        "404: the control API's own cost, with no split")
    p.add_argument("--timeline", action="store_true",
                   help="log every write's latency (fio --write_lat_log) and report, per 5 ms "
                        "after each trigger was sent, how many writes completed, their mean "
                        "and p99 latency, and where the run's slowest 0.1 %% fell")
    p.add_argument("--iodepth", type=int, default=16)
    p.add_argument("--bs", type=parse_size, default=parse_size("4k"))
    p.add_argument("--delay", type=float, default=0.5,
                   help="seconds after fio starts before the first trigger")
    p.add_argument("--modes", default="no-triggers,triggers",
                   help="comma-separated, from: no-triggers (fio alone), triggers (fio and "
                        "triggers on its LU), triggers-other-lu (fio on its LU, triggers on a "
                        "second LU nothing writes to: the control path's cost alone), "
                        "idle-triggers (triggers, no fio: the split's floor); the order "
                        "rotates each repeat (default: no-triggers,triggers)")
    p.add_argument("--no-probe", dest="probe", action="store_false",
                   help="do not GET the LU's status after each trigger (by default the thread "
                        "does, to record how many chunks the split gave the new backup to copy)")
    add_source_args(p)
    args = p.parse_args(argv)
    if args.runtime < 2 or args.repeat < 1 or args.interval <= 0 or args.pool < 2:
        p.error("--runtime ≥ 2, --repeat ≥ 1, --interval > 0 and --pool ≥ 2 are needed")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.mode_list or any(m not in MODES for m in args.mode_list):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    check_tools(p, args, [args.fio])
    return args


class Triggerer(threading.Thread):
    """POSTs a trigger every ``interval`` s (no catch-up bursts) until stopped."""

    def __init__(self, server: MirroredMirrorpool, interval: float, start_at: float,
                 stop_at: float, probe: bool, lu: str = LU_NAME, mechanism: str = "api") -> None:
        super().__init__(name="triggerer", daemon=True)
        self.api = Api(server.api_port)
        self.nbd: NbdClient | None = None
        if mechanism == "in-band":
            self.nbd = NbdClient(f"nbd://127.0.0.1:{server.port}/{lu}",
                                 contexts=(TRIGGER_CONTEXT,))
        self.server = server
        self.interval = interval
        self.start_at = start_at
        self.stop_at = stop_at
        self.probe = probe
        self.lu = lu
        self.mechanism = mechanism
        self.halt = threading.Event()
        self.results: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            nxt = self.start_at
            while not self.halt.is_set():
                now = time.monotonic()
                if now < nxt and self.halt.wait(nxt - now):
                    break
                if time.monotonic() >= self.stop_at:
                    break
                sent, wall = time.monotonic(), time.time()
                try:
                    if self.mechanism == "api-noop":
                        self.api.post(f"/v1/lus/{NO_SUCH_LU}/trigger", {"label": "bench"})
                    if self.nbd is not None:
                        answer = self.nbd.trigger("bench")
                    else:
                        answer = self.api.post(f"/v1/lus/{self.lu}/trigger", {"label": "bench"})
                    rtt = time.monotonic() - sent
                    gen = answer["generations"][0]
                    row = {"t": sent, "wall": wall, "split_ms": gen["split_ms"],
                           "rtt_ms": rtt * 1000,
                           "settle_ms": gen.get("settle_ms"), "gen": gen["gen"]}
                    if self.probe:
                        row.update(probe(self.api, self.lu))
                    self.results.append(row)
                except (ApiError, NbdError) as exc:
                    detail = exc.detail if isinstance(exc, ApiError) else str(exc)
                    self.results.append({"t": sent, "wall": wall, "refused": detail,
                                         "rtt_ms": (time.monotonic() - sent) * 1000})
                nxt = max(nxt + self.interval, time.monotonic())
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.api.close()
            if self.nbd is not None:
                self.nbd.close()


def probe(api: Api, lu: str) -> dict[str, Any]:
    """What the split just made the pool do: chunks the new active backup has to copy, and
    how many generations are still being completed (their chunks are copied before write)."""
    mirror = api.get(f"/v1/lus/{lu}")["mirror"]
    sync = mirror.get("sync") or {}
    return {
        "copy_chunks": int(sync.get("chunks_total", 0)),
        "gens_completing": sum(1 for m in mirror["members"] if m["state"] == "generation"
                               and (m.get("sync") or {}).get("chunks_left")),
    }


def settle(server: MirroredMirrorpool, pool: int) -> float:
    """Make every member current: ``pool`` triggers, each waited out until in sync.

    Without this, the first triggers of a run would recycle members left stale by
    everything the previous run wrote, and the run would start with that backlog."""
    t0 = time.monotonic()
    for _ in range(pool):
        server.trigger()
        server.wait_in_sync(600)
    return time.monotonic() - t0


def one_run(server: MirroredMirrorpool, fio: Fio, args: argparse.Namespace, mode: str,
            repeat: int, chunk: int) -> dict[str, Any]:
    waited = settle(server, args.pool)
    sync_files(server.files())
    la = loadavg()
    opts = ["--rw=randwrite", f"--bs={args.bs}", f"--iodepth={args.iodepth}",
            f"--size={args.size}", f"--runtime={args.runtime}", "--time_based",
            "--percentile_list=50:99:99.9"]
    lat_log = fio.outdir / f"lat-{mode}-r{repeat}"
    if args.timeline:
        opts += [f"--write_lat_log={lat_log}", "--log_avg_msec=0", "--log_unix_epoch=1"]
    t0 = time.monotonic()
    if mode != "idle-triggers":
        fio.start(f"{mode}-r{repeat}", server.uri, opts)
    trig = None
    if mode != "no-triggers":
        trig = Triggerer(server, args.interval, t0 + args.delay, t0 + args.runtime - 0.2,
                         args.probe, OTHER_LU if mode == "triggers-other-lu" else LU_NAME,
                         args.mechanism)
        trig.start()
    try:
        if mode == "idle-triggers":
            time.sleep(args.runtime)
            side: dict[str, Any] = {"iops": float("nan"), "io_bytes": 0, "clat_ns": {}}
        else:
            side = write_side(fio.wait(args.runtime * 4 + 60))
    finally:
        if trig is not None:
            trig.halt.set()
            trig.join(30)
    if trig is not None and trig.error is not None:
        raise RuntimeError(f"trigger thread failed: {trig.error!r}")
    server.check_alive()
    mirror = server.mirror()
    sync_after = mirror.get("sync") or {}
    catch_up, _ = server.wait_in_sync(600)
    row: dict[str, Any] = {
        "repeat": repeat, "mode": mode, "loadavg": la, "chunk": chunk,
        "iops": float(side["iops"]), "written_bytes": int(side["io_bytes"]),
        "p50_us": percentile_of(side, 50.0), "p99_us": percentile_of(side, 99.0),
        "p999_us": percentile_of(side, 99.9),
        "max_us": float(side.get("clat_ns", {}).get("max", float("nan"))) / 1000.0,
        "state_after": mirror["active_state"],
        "chunks_left_after": sync_after.get("chunks_left"),
        "catch_up_s": catch_up, "settle_s": waited,
    }
    if trig is not None:
        ok = [r for r in trig.results if "split_ms" in r]
        refused = [r for r in trig.results if "refused" in r]
        splits = [r["split_ms"] for r in ok]
        settles = [r["settle_ms"] for r in ok if r.get("settle_ms") is not None]
        rtts = [r["rtt_ms"] for r in trig.results]
        row.update({
            "settle_p50_ms": pct(settles, 50), "settle_p99_ms": pct(settles, 99),
            "triggers": len(ok), "refused": len(refused),
            "refusals": sorted({r["refused"] for r in refused}),
            "split_p50_ms": pct(splits, 50), "split_p99_ms": pct(splits, 99),
            "split_max_ms": max(splits, default=float("nan")),
            "rtt_p50_ms": pct(rtts, 50), "rtt_p99_ms": pct(rtts, 99),
            "split_ms": splits, "rtt_ms": rtts,
        })
        log_file = Path(f"{lat_log}_clat.1.log")
        if args.timeline and log_file.exists():
            row["timeline"] = timeline(log_file, [r["wall"] for r in trig.results],
                                       args.interval)
            log_file.unlink()
        if args.probe and ok:
            copies = [r["copy_chunks"] for r in ok]
            row.update({
                "copy_chunks": copies, "copy_chunks_p50": pct(copies, 50),
                "copy_chunks_p90": pct(copies, 90), "copy_chunks_max": max(copies),
                "share_with_gen_completing": sum(1 for r in ok if r["gens_completing"])
                / len(ok),
            })
    return row


def timeline(log: Path, sent: list[float], interval: float) -> list[dict[str, float]]:
    """Writes completed in each TIMELINE_BIN_MS after a trigger was sent (per trigger),
    their mean and p99 latency, and the share of the run's slowest 0.1 % in the bin."""
    starts = sorted(t * 1000.0 for t in sent)
    done: list[tuple[float, float]] = []  # (completion ms since epoch, latency µs)
    with open(log) as f:
        for line in f:
            fields = line.split(",")
            done.append((float(fields[0]), int(fields[1]) / 1000.0))
    if not done or not starts:
        return []
    cut = sorted((lat for _, lat in done), reverse=True)[len(done) // 1000]
    bins: dict[int, list[float]] = {}
    for at, lat in done:
        i = bisect.bisect_right(starts, at) - 1
        if i >= 0 and at - starts[i] < interval * 1000:
            bins.setdefault(int(at - starts[i]) // TIMELINE_BIN_MS * TIMELINE_BIN_MS,
                            []).append(lat)
    slow = sum(1 for v in bins.values() for lat in v if lat >= cut) or 1
    out = []
    for start in sorted(bins):
        lats = sorted(bins[start])
        out.append({"ms": start, "writes_per_trigger": len(lats) / len(starts),
                    "mean_us": sum(lats) / len(lats), "p99_us": lats[int(len(lats) * 0.99)],
                    "slowest_share": sum(1 for lat in lats if lat >= cut) / slow})
    return out


def verdict(value: float, aim: float, limit: float) -> str:
    if value != value:  # NaN
        return "no data"
    if value <= aim:
        return "meets the aim"
    return "misses the aim" if value <= limit else "NOT DONE (over the limit)"


def report(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    table = [["repeat", "mode", "IOPS", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "triggers",
              "refused", "split p50 ms", "split p99 ms", "split max ms", "API rtt p99 ms",
              "after run", "catch-up s", "loadavg before"]]
    for r in rows:
        trig = "split_p50_ms" in r
        table.append([
            str(r["repeat"]), r["mode"], f"{r['iops']:,.0f}", f"{r['p50_us']:,.0f}",
            f"{r['p99_us']:,.0f}", f"{r['p999_us']:,.0f}", f"{r['max_us']:,.0f}",
            str(r.get("triggers", "-")), str(r.get("refused", "-")),
            f"{r['split_p50_ms']:.3f}" if trig else "-",
            f"{r['split_p99_ms']:.3f}" if trig else "-",
            f"{r['split_max_ms']:.3f}" if trig else "-",
            f"{r['rtt_p99_ms']:.1f}" if trig else "-",
            f"{r['state_after']} ({r['chunks_left_after']} left)" if
            r["state_after"] != "in-sync" else "in-sync",
            f"{r['catch_up_s']:.2f}", r["loadavg"],
        ])
    text = "Every run:\n" + render_table(table, right=set(range(2, 13)) | {14})
    probed = [r for r in rows if "copy_chunks_p50" in r]
    if probed:
        ptable = [["repeat", "mode", "written by fio", "to copy per trigger: p50",
                   "p90", "max", "triggers finding a generation still completing"]]
        for r in probed:
            def mib(n: float, r: dict[str, Any] = r) -> str:
                return f"{n * r['chunk'] / MIB:,.1f} MiB"
            ptable.append([str(r["repeat"]), r["mode"],
                           f"{r['written_bytes'] / MIB:,.0f} MiB" if r["written_bytes"] else "-",
                           mib(r["copy_chunks_p50"]), mib(r["copy_chunks_p90"]),
                           mib(r["copy_chunks_max"]),
                           f"{r['share_with_gen_completing'] * 100:.0f} %"])
        text += ("\n\nWork each split hands the pool: the new active backup's chunks_total x "
                 f"{probed[0]['chunk'] // 1024} KiB chunk,\nread from the status right after "
                 "each trigger (a backlog not yet copied is counted again\nat the next "
                 "trigger); a generation 'still completing' makes writes to its missing\n"
                 "chunks copy them first:\n" + render_table(ptable, right={2, 3, 4, 5, 6}))

    lined = [r for r in rows if r.get("timeline")]
    if lined:
        ttable = [["ms after trigger sent", *[f"r{r['repeat']} {r['mode']}: writes, mean µs, "
                                                "p99 µs, slowest 0.1 %" for r in lined]]]
        for b in sorted({b["ms"] for r in lined for b in r["timeline"]}):
            cells = []
            for r in lined:
                got = next((x for x in r["timeline"] if x["ms"] == b), None)
                cells.append("-" if got is None else
                             f"{got['writes_per_trigger']:.1f}, {got['mean_us']:,.0f}, "
                             f"{got['p99_us']:,.0f}, {got['slowest_share'] * 100:.0f} %")
            ttable.append([f"{b}-{b + TIMELINE_BIN_MS}", *cells])
        text += ("\n\nTimeline (--timeline): per bin after each trigger was sent, writes "
                 "completed per trigger, their mean and p99 latency, and the share of the "
                 "run's slowest 0.1 % of writes:\n" + render_table(ttable, right=set()))

    def med(mode: str, key: str) -> float:
        return median([r[key] for r in rows if r["mode"] == mode])

    repeats = sorted({r["repeat"] for r in rows})
    ratios = []
    for rep in repeats:
        by = {r["mode"]: r for r in rows if r["repeat"] == rep}
        if "triggers" in by and "no-triggers" in by:
            ratios.append(by["triggers"]["p999_us"] / by["no-triggers"]["p999_us"])
    every_split = [x for r in rows if r["mode"] == "triggers" for x in r["split_ms"]]
    summary = {
        "p999_us_no_triggers": med("no-triggers", "p999_us"),
        "p999_us_triggers": med("triggers", "p999_us"),
        "p999_ratio_median_of_repeats": median(ratios),
        "p999_ratios": ratios,
        "iops_no_triggers": med("no-triggers", "iops"),
        "iops_triggers": med("triggers", "iops"),
        "p99_us_no_triggers": med("no-triggers", "p99_us"),
        "p99_us_triggers": med("triggers", "p99_us"),
        "split_p50_ms": med("triggers", "split_p50_ms"),
        "split_p99_ms": med("triggers", "split_p99_ms"),
        "split_max_ms": med("triggers", "split_max_ms"),
        "settle_p50_ms": med("triggers", "settle_p50_ms"),
        "settle_p99_ms": med("triggers", "settle_p99_ms"),
        "split_all": {"n": len(every_split), "p50_ms": pct(every_split, 50),
                      "p99_ms": pct(every_split, 99),
                      "max_ms": max(every_split, default=float("nan"))},
    }
    s = summary
    main = [["figure (median of repeats)", "no triggers", "trigger every interval", "ratio",
             "verdict"],
            ["write IOPS", f"{s['iops_no_triggers']:,.0f}", f"{s['iops_triggers']:,.0f}",
             f"{s['iops_triggers'] / s['iops_no_triggers']:.2f}", ""],
            ["clat p99 µs", f"{s['p99_us_no_triggers']:,.0f}", f"{s['p99_us_triggers']:,.0f}",
             f"{s['p99_us_triggers'] / s['p99_us_no_triggers']:.2f}", ""],
            ["clat p99.9 µs", f"{s['p999_us_no_triggers']:,.0f}",
             f"{s['p999_us_triggers']:,.0f}",
             f"{s['p999_ratio_median_of_repeats']:.2f}",
             f"{verdict(s['p999_ratio_median_of_repeats'], RATIO_AIM, RATIO_LIMIT)} "
             f"(aim ≤ {RATIO_AIM}, limit {RATIO_LIMIT})"]]
    split = [["split_ms", "median of repeats", f"all {s['split_all']['n']} triggers", "verdict"],
             ["p50", f"{s['split_p50_ms']:.3f}", f"{s['split_all']['p50_ms']:.3f}", ""],
             ["p99", f"{s['split_p99_ms']:.3f}", f"{s['split_all']['p99_ms']:.3f}",
              f"{verdict(s['split_p99_ms'], SPLIT_AIM_MS, SPLIT_LIMIT_MS)} "
              f"(aim < {SPLIT_AIM_MS} ms, limit {SPLIT_LIMIT_MS} ms)"],
             ["max", f"{s['split_max_ms']:.3f}", f"{s['split_all']['max_ms']:.3f}", ""],
             ["settle_ms p50 / p99", f"{s['settle_p50_ms']:.3f} / {s['settle_p99_ms']:.3f}",
              "", "(every earlier write done; the answer waits for it)"]]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    if any(m not in ("no-triggers", "triggers") for m in modes):
        mt = [["mode (median of repeats)", "IOPS", "p99 µs", "p99.9 µs", "split p50 ms",
               "split p99 ms", "split max ms"]]
        for m in modes:
            mine = [r for r in rows if r["mode"] == m]

            def f(key: str, fmt: str, mine: list[dict[str, Any]] = mine) -> str:
                vals = [r[key] for r in mine if key in r and r[key] == r[key]]
                return format(median(vals), fmt) if vals else "-"
            mt.append([m, f("iops", ",.0f"), f("p99_us", ",.0f"), f("p999_us", ",.0f"),
                       f("split_p50_ms", ".3f"), f("split_p99_ms", ".3f"),
                       f("split_max_ms", ".3f")])
        text = "By mode:\n" + render_table(mt, right=set(range(1, 7))) + "\n\n" + text
    text = (render_table(main, right={1, 2, 3}) + "\n\n" + render_table(split, right={1, 2})
            + "\n\np99.9 ratio = triggers/no-triggers within each repeat, median over repeats "
              f"(per repeat: {', '.join(f'{x:.2f}' for x in ratios)}).\n"
              "split_ms: trigger received → generation readable, from each trigger's answer"
              " (reads of it wait only for earlier writes they overlap).\n"
              "catch-up s: after fio stops, time until the active backup is in sync.\n\n"
            + text)
    return text, summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    tmp = Path(tempfile.mkdtemp(prefix="trigger-load-", dir=args.tmpdir))
    server: MirroredMirrorpool | None = None
    fio: Fio | None = None
    rows: list[dict[str, Any]] = []
    try:
        backing = tmp / "backing.img"
        info, launcher, mp_env, digest = header(command, args, tmp, {
            "LU": f"{backing}, {args.size} bytes of random data, pool {args.pool}, page cache",
            "config": f"fio randwrite bs {args.bs} iodepth {args.iodepth}, {args.runtime}s per "
                      f"run, repeat {args.repeat}, trigger every {args.interval * 1000:.0f} ms "
                      f"({args.mechanism}) from {args.delay}s after fio starts, modes "
                      f"{','.join(args.mode_list)}, "
                      f"mirrorpool args "
                      f"{args.mirrorpool_args or '(none)'}",
        })
        progress(f"filling {backing} with {args.size >> 20} MiB of random data")
        fill_random(backing, args.size)
        fio = Fio(args.fio, tmp)
        for repeat in range(1, args.repeat + 1):
            k = (repeat - 1) % len(args.mode_list)
            order = [*args.mode_list[k:], *args.mode_list[:k]]
            server = MirroredMirrorpool(name="mirrorpool", launcher=launcher, env=mp_env,
                                        extra_args=shlex.split(args.mirrorpool_args),
                                        pool=args.pool, backing=backing, size=args.size,
                                        workdir=tmp)
            server.start()
            progress(f"repeat {repeat}/{args.repeat}: mirrorpool pid "
                     f"{server.proc.pid if server.proc else '?'}, warming up the pool")
            try:
                assert server.api is not None
                if "triggers-other-lu" in args.mode_list:
                    server.api.post("/v1/lus", {"name": OTHER_LU, "size": 64 << 20,
                                                "pool": args.pool})
                for _ in range(args.pool - 1):  # every member holds data before the runs
                    server.trigger()
                    server.wait_in_sync(600)
                    if "triggers-other-lu" in args.mode_list:
                        server.api.post(f"/v1/lus/{OTHER_LU}/trigger", {})
                chunk = tracking_chunk(server.api)
                for mode in order:
                    row = one_run(server, fio, args, mode, repeat, chunk)
                    rows.append(row)
                    extra = (f", {row['triggers']} triggers ({row['refused']} refused), split "
                             f"p50/p99/max {row['split_p50_ms']:.3f}/{row['split_p99_ms']:.3f}/"
                             f"{row['split_max_ms']:.3f} ms" if "split_p50_ms" in row else "")
                    progress(f"  {mode:<12} {row['iops']:8,.0f} IOPS  p50/p99/p99.9 "
                             f"{row['p50_us']:,.0f}/{row['p99_us']:,.0f}/{row['p999_us']:,.0f} µs"
                             f"{extra}; catch-up {row['catch_up_s']:.2f}s (loadavg before "
                             f"{row['loadavg']})")
            finally:
                server.stop()
                server = None
        text, summary = report(rows)
        print(text)
        exit_note(args.mirrorpool_src, digest)
        info["loadavg at end"] = loadavg()
        dump_json(args.json_out, {
            "command": command, "machine": info, "mirrorpool_source_sha256": digest,
            "config": {k: v for k, v in vars(args).items() if k != "func"},
            "runs": rows, "summary": summary,
        })
        return 0
    finally:
        if fio is not None:
            fio.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
