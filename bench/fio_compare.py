#!/usr/bin/env python3
"""Compare mirrorpool with nbdkit and qemu-nbd serving the same file, driven by fio.

One run makes a file of random data in a temporary directory, then serves it
with each server in turn (never two at once, loopback only) and drives each
with fio's nbd engine on the same workloads.  Every server reads and writes
through the page cache (no O_DIRECT), so the comparison is of the servers, not
of the disk.  Each (server, workload) pair is measured ``--repeat`` times, with
the servers' order rotated on every repeat so that drift on a shared machine
falls on all of them alike, and the median is reported.

Run from the project root::

    .venv/bin/python bench/fio_compare.py --runtime 5 --repeat 3
    .venv/bin/python bench/fio_compare.py --mirrorpool-args "--workers 1"

Servers are started and stopped by PID only, and always stopped (and the
temporary directory removed) on the way out, whatever happened.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

MIB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
LU_NAME = "bench"
SERVERS = ("mirrorpool", "nbdkit", "qemu-nbd")
FILL_CHUNK = 4 * MIB
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


# ---------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # fio's --rw
    bs: int
    iodepth: int

    @property
    def is_write(self) -> bool:
        return "write" in self.rw

    @property
    def bandwidth(self) -> bool:
        """Large blocks are reported in MiB/s, small ones in IOPS."""
        return self.bs >= MIB

    @property
    def unit(self) -> str:
        return "MiB/s" if self.bandwidth else "IOPS"

    @property
    def threshold(self) -> float:
        """The mirrorpool/reference ratio under which a result is flagged."""
        return 0.8 if self.bandwidth else 1.0


WORKLOADS: tuple[Workload, ...] = (
    Workload("seq-write-1m-qd8", "write", MIB, 8),
    Workload("seq-read-1m-qd8", "read", MIB, 8),
    Workload("rand-write-4k-qd1", "randwrite", 4096, 1),
    Workload("rand-write-4k-qd16", "randwrite", 4096, 16),
    Workload("rand-read-4k-qd1", "randread", 4096, 1),
    Workload("rand-read-4k-qd16", "randread", 4096, 16),
)


@dataclass
class Sample:
    repeat: int
    server: str
    workload: str
    value: float  # MiB/s or IOPS, as the workload's unit says
    unit: str
    iops: float
    mib_s: float
    p99_us: float
    mean_lat_us: float


# ---------------------------------------------------------------- helpers


def parse_size(text: str) -> int:
    """'1G', '512M', '1GiB', '4096' -> bytes (binary multiples, as fio reads them)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1G, 512M)")
    shift = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]
    size = int(m.group(1)) << shift
    if size <= 0 or size % 4096:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 4 KiB")
    return size


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on 127.0.0.1:{port} after {START_TIMEOUT}s")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process by its PID, then SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else f"unavailable (exit {out.returncode})"


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def filesystem_of(path: Path) -> str:
    """'ext4 on /dev/vda (mounted at /)' for the mount holding path, from /proc/mounts."""
    best = ("", "?", "?")
    real = str(path.resolve())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype, *_ = line.split()
                mnt = mnt.replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} on {best[2]} (mounted at {best[0] or '?'})"


def fill_random(path: Path, size: int) -> None:
    """Write the whole file with random bytes once, so every read hits a real block."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(FILL_CHUNK, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def sync_file(path: Path) -> None:
    """Write back what the last workload dirtied, so it does not slow down the next."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def source_digest(package: Path) -> str:
    """sha256 over the relative paths and contents of a package's .py files."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(str(path.relative_to(package)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def snapshot_source(src: Path, dest: Path) -> str:
    """Copy the mirrorpool package under dest, so edits made meanwhile do not reach the run."""
    shutil.copytree(src / "mirrorpool", dest / "mirrorpool",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return source_digest(dest / "mirrorpool")


# ---------------------------------------------------------------- servers


@dataclass
class Server:
    """One NBD server process serving the backing file on a loopback port."""

    name: str
    backing: Path
    size: int
    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    starts: int = 0

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.log_path = self.workdir / f"{self.name}-{self.starts}.log"
        with open(self.log_path, "ab") as log:
            # A session of its own: a ^C on the terminal reaches only this
            # script, which then stops the server itself, by PID.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         cwd=self.workdir, start_new_session=True)

    def start(self) -> None:
        self.starts += 1
        self.port = free_port()
        self._spawn(self.command())
        assert self.proc is not None
        wait_for_port(self.port, self.proc, self.name)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            log = tail(self.log_path) if self.log_path else ""
            raise RuntimeError(f"{self.name} is not running (exit {code}); log:\n{log}")


@dataclass
class MirrorpoolServer(Server):
    # How to run the mirrorpool CLI: its executable, or [python, -m, mirrorpool]
    # with PYTHONPATH (in env) pointing at a snapshot of the source.
    launcher: list[str] = field(default_factory=lambda: ["mirrorpool"])
    env: dict[str, str] | None = None
    extra_args: list[str] = field(default_factory=list)
    api_port: int = 0

    def command(self) -> list[str]:
        data = self.workdir / f"mirrorpool-data-{self.starts}"
        return [
            *self.launcher, "serve", "--data", str(data),
            "--listen", f"127.0.0.1:{self.port}", "--api", f"127.0.0.1:{self.api_port}",
            *self.extra_args,
        ]

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{LU_NAME}"

    def start(self) -> None:
        self.starts += 1  # a fresh data directory (so a fresh catalog) every start
        self.port = free_port()
        self.api_port = free_port()
        self._spawn(self.command(), self.env)
        assert self.proc is not None
        wait_for_port(self.api_port, self.proc, "mirrorpool (control API)")
        wait_for_port(self.port, self.proc, "mirrorpool (NBD)")
        env = {**(self.env or os.environ), "MIRRORPOOL_API": f"http://127.0.0.1:{self.api_port}"}
        create = [*self.launcher, "lu", "create", LU_NAME, "--size", str(self.size),
                  "--pool", "0", "--backing", str(self.backing)]
        out = subprocess.run(create, capture_output=True, text=True, env=env, cwd=self.workdir,
                             timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{shlex.join(create)} failed: {out.stderr or out.stdout}")


@dataclass
class NbdkitServer(Server):
    def command(self) -> list[str]:
        # Default thread model (the file plugin runs in parallel) and default
        # cache mode (through the page cache).
        return ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(self.port),
                "file", str(self.backing)]


@dataclass
class QemuNbdServer(Server):
    def command(self) -> list[str]:
        return ["qemu-nbd", "-f", "raw", "--cache=writeback", "--aio=threads", "-t",
                "--shared=16", "-b", "127.0.0.1", "-p", str(self.port), str(self.backing)]


# ---------------------------------------------------------------- fio


def fio_command(fio: str, uri: str, w: Workload, size: int, runtime: int,
                output: Path) -> list[str]:
    return [
        fio, f"--name={w.name}", "--ioengine=nbd", f"--uri={uri}",
        f"--rw={w.rw}", f"--bs={w.bs}", f"--iodepth={w.iodepth}", "--numjobs=1",
        f"--size={size}", f"--runtime={runtime}", "--time_based",
        "--output-format=json", f"--output={output}",
    ]


def parse_fio(path: Path, w: Workload) -> dict[str, float]:
    text = path.read_text(errors="replace")
    start = text.find("{")
    if start < 0:
        raise RuntimeError(f"no JSON in fio output {path}:\n{text[-2000:]}")
    doc, _ = json.JSONDecoder().raw_decode(text, start)
    job = doc["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job {w.name} failed with error {job['error']}")
    side = job["write" if w.is_write else "read"]
    if not side.get("total_ios"):
        raise RuntimeError(f"fio job {w.name} did no I/O")
    percentiles = side.get("clat_ns", {}).get("percentile", {})
    p99 = next((v for k, v in percentiles.items() if float(k) == 99.0), float("nan"))
    return {
        "iops": float(side["iops"]),
        "mib_s": float(side["bw_bytes"]) / MIB,
        "p99_us": float(p99) / 1000.0,
        "mean_lat_us": float(side.get("lat_ns", {}).get("mean", float("nan"))) / 1000.0,
    }


class FioRunner:
    def __init__(self, fio: str, size: int, runtime: int, outdir: Path) -> None:
        self.fio = fio
        self.size = size
        self.runtime = runtime
        self.outdir = outdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.count = 0

    def run(self, server: Server, w: Workload) -> dict[str, float]:
        self.count += 1
        out = self.outdir / f"fio-{self.count:03d}-{server.name}-{w.name}.json"
        log = self.outdir / f"fio-{self.count:03d}.log"
        cmd = fio_command(self.fio, server.uri, w, self.size, self.runtime, out)
        with open(log, "wb") as lf:
            self.proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = self.proc.wait(self.runtime * 4 + 60)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            raise RuntimeError(f"fio timed out: {shlex.join(cmd)}") from None
        finally:
            self.proc = None
        if code != 0:
            raise RuntimeError(f"fio exited with {code}: {shlex.join(cmd)}\n{tail(log)}")
        return parse_fio(out, w)

    def stop(self) -> None:
        stop_process(self.proc)


# ---------------------------------------------------------------- reporting


def machine_info(fio: str, backing_dir: Path) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
                break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "qemu-nbd": first_line(["qemu-nbd", "--version"]),
        "fio": first_line([fio, "--version"]),
        "backing filesystem": filesystem_of(backing_dir),
    }


def git_state(src: Path) -> str:
    """'git 598a8a2, mirrorpool/ differs from HEAD' for the repository holding src."""
    probe = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return "not in a git checkout"
    rev = probe.stdout.strip()
    status = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "mirrorpool"],
                            capture_output=True, text=True).stdout.strip()
    return f"git {rev}" + (", mirrorpool/ differs from HEAD" if status else ", clean")


def fmt_value(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    return f"{x:,.1f}" if unit == "MiB/s" else f"{x:,.0f}"


def fmt_ratio(mp: float | None, ref: float | None, threshold: float) -> str:
    if mp is None or not ref:
        return "-"
    r = mp / ref
    return f"{r:.2f}{' !' if r < threshold else ''}"


def render_table(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                 for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def medians(samples: list[Sample], servers: Sequence[str],
            workloads: Sequence[Workload]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for w in workloads:
        out[w.name] = {}
        for s in servers:
            mine = [x for x in samples if x.server == s and x.workload == w.name]
            if mine:
                out[w.name][s] = {
                    "value": statistics.median(x.value for x in mine),
                    "p99_us": statistics.median(x.p99_us for x in mine),
                    "runs": len(mine),
                }
    return out


def report(samples: list[Sample], servers: Sequence[str], workloads: Sequence[Workload],
           med: dict[str, dict[str, dict[str, float]]]) -> str:
    def get(w: str, s: str, key: str) -> float | None:
        return med.get(w, {}).get(s, {}).get(key)

    head = ["workload", "unit", *servers, "mp/nbdkit", "mp/qemu-nbd",
            *(f"p99µs {s}" for s in servers)]
    rows = [head]
    for w in workloads:
        rows.append([
            w.name, w.unit,
            *(fmt_value(get(w.name, s, "value"), w.unit) for s in servers),
            fmt_ratio(get(w.name, "mirrorpool", "value"), get(w.name, "nbdkit", "value"),
                      w.threshold),
            fmt_ratio(get(w.name, "mirrorpool", "value"), get(w.name, "qemu-nbd", "value"),
                      w.threshold),
            *(fmt_value(get(w.name, s, "p99_us"), "IOPS") for s in servers),
        ])
    main = render_table(rows, right=set(range(2, len(head))))

    raw = [["workload", "server", "runs (value, in repeat order)", "p99 µs per run"]]
    for w in workloads:
        for s in servers:
            mine = sorted((x for x in samples if x.server == s and x.workload == w.name),
                          key=lambda x: x.repeat)
            if mine:
                raw.append([w.name, s, ", ".join(fmt_value(x.value, x.unit) for x in mine),
                            ", ".join(f"{x.p99_us:,.0f}" for x in mine)])
    legend = ("median of the repeats; MiB/s for 1 MiB blocks, IOPS for 4 KiB blocks; p99 is\n"
              "fio's completion-latency 99th percentile; '!' marks mirrorpool under 0.8x the\n"
              "reference on 1 MiB workloads or under 1.0x on 4 KiB workloads.")
    return f"{main}\n\n{legend}\n\nEvery run:\n{render_table(raw, right=set())}"


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Compare mirrorpool, nbdkit and qemu-nbd serving one file, with fio.",
        epilog="workloads: " + ", ".join(w.name for w in WORKLOADS),
    )
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio job (time_based)")
    p.add_argument("--size", type=parse_size, default=parse_size("1G"),
                   help="size of the backing file and of fio's region (default 1G)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per server and workload; the median is reported")
    p.add_argument("--workloads", default="*",
                   help="comma-separated names or glob patterns (default: all)")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"comma-separated subset of {','.join(SERVERS)} (default: all)")
    p.add_argument("--mirrorpool-args", default="",
                   help="extra arguments for `mirrorpool serve`, e.g. \"--workers 1\"")
    p.add_argument("--mirrorpool-src", default=str(REPO / "src"),
                   help="directory holding the mirrorpool package; it is copied when the run "
                        "starts and the copy is what runs, so edits made meanwhile do not "
                        "mix code versions within a run (default: this checkout's src)")
    p.add_argument("--mirrorpool-bin", default=None,
                   help="run this mirrorpool executable as it is instead (no snapshot)")
    p.add_argument("--fio", default="fio", help="the fio executable")
    p.add_argument("--tmpdir", default=None,
                   help="where to make the temporary directory holding the backing file")
    p.add_argument("--json-out", default=None, help="also write every result to this file")
    args = p.parse_args(argv)
    if args.runtime < 1 or args.repeat < 1:
        p.error("--runtime and --repeat must be at least 1")
    patterns = [x.strip() for x in args.workloads.split(",") if x.strip()]
    args.workload_list = [w for w in WORKLOADS
                          if any(fnmatch.fnmatch(w.name, pat) for pat in patterns)]
    if not args.workload_list:
        p.error(f"--workloads {args.workloads!r} matches none of "
                f"{', '.join(w.name for w in WORKLOADS)}")
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in args.server_list if s not in SERVERS]
    if unknown or not args.server_list:
        p.error(f"--servers: unknown {unknown}; choose from {', '.join(SERVERS)}")
    args.server_list = [s for s in SERVERS if s in args.server_list]
    tools = [args.fio, "nbdkit", "qemu-nbd"]
    if args.mirrorpool_bin is not None:
        tools.append(args.mirrorpool_bin)
    elif not (Path(args.mirrorpool_src) / "mirrorpool" / "__main__.py").is_file():
        p.error(f"--mirrorpool-src {args.mirrorpool_src} holds no mirrorpool package")
    for tool in tools:
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed or not on PATH")
    return args


def mirrorpool_launcher(args: argparse.Namespace, tmp: Path) -> tuple[list[str], dict[str, str],
                                                                      str, str | None]:
    """How to run mirrorpool, its environment, a description, and the snapshot's digest."""
    env = dict(os.environ)
    if args.mirrorpool_bin is not None:
        launcher = [args.mirrorpool_bin]
        return launcher, env, f"{first_line([*launcher, '--version'])} from " \
                              f"{shutil.which(args.mirrorpool_bin)} (no snapshot)", None
    src = Path(args.mirrorpool_src).resolve()
    snap = tmp / "mirrorpool-src"
    digest = snapshot_source(src, snap)
    env["PYTHONPATH"] = os.pathsep.join([str(snap), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    launcher = [sys.executable, "-m", "mirrorpool"]
    probe = subprocess.run([*launcher, "--version"], capture_output=True, text=True, env=env,
                           cwd=tmp, timeout=60)
    where = subprocess.run(
        [sys.executable, "-c", "import mirrorpool, sys; sys.stdout.write(mirrorpool.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp, timeout=60,
    ).stdout
    if not where.startswith(str(snap)):
        raise RuntimeError(f"the snapshot is not what runs: mirrorpool comes from {where!r}")
    version = probe.stdout.strip().splitlines()[0] if probe.stdout.strip() else "?"
    desc = (f"{version}, snapshot of {src / 'mirrorpool'} taken at start "
            f"(sha256 {digest[:16]}, {git_state(src)})")
    return launcher, env, desc, digest


def rotations(items: Sequence[str], repeat: int) -> Iterator[tuple[int, list[str]]]:
    """Each repeat starts with the next server, so each gets every position in turn."""
    for r in range(repeat):
        k = r % len(items)
        yield r + 1, [*items[k:], *items[:k]]


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)

    tmp = Path(tempfile.mkdtemp(prefix="fio-compare-", dir=args.tmpdir))
    servers: dict[str, Server] = {}
    fio: FioRunner | None = None
    samples: list[Sample] = []
    try:
        backing = tmp / "backing.img"
        info = machine_info(args.fio, tmp)
        launcher, mp_env, info["mirrorpool"], digest = mirrorpool_launcher(args, tmp)
        print(f"command: {command}")
        print(f"cwd: {os.getcwd()}")
        for k, v in info.items():
            print(f"{k}: {v}")
        print(f"backing file: {backing} ({args.size} bytes of random data, page cache "
              f"for every server)")
        print(f"runtime {args.runtime}s per job, repeat {args.repeat}, servers "
              f"{', '.join(args.server_list)}, mirrorpool args "
              f"{args.mirrorpool_args or '(none)'}")
        print(flush=True)

        progress(f"filling {backing} with {args.size >> 20} MiB of random data")
        fill_random(backing, args.size)

        common = {"backing": backing, "size": args.size, "workdir": tmp}
        every: dict[str, Server] = {
            "mirrorpool": MirrorpoolServer(name="mirrorpool", launcher=launcher, env=mp_env,
                                           extra_args=shlex.split(args.mirrorpool_args),
                                           **common),
            "nbdkit": NbdkitServer(name="nbdkit", **common),
            "qemu-nbd": QemuNbdServer(name="qemu-nbd", **common),
        }
        servers = {name: every[name] for name in args.server_list}
        fio = FioRunner(args.fio, args.size, args.runtime, tmp)

        for repeat, order in rotations(args.server_list, args.repeat):
            for name in order:
                server = servers[name]
                server.start()
                pid = server.proc.pid if server.proc else "?"
                progress(f"repeat {repeat}/{args.repeat}: {name} pid {pid} at {server.uri}")
                try:
                    for w in args.workload_list:
                        sync_file(backing)
                        res = fio.run(server, w)
                        server.check_alive()
                        value = res["mib_s"] if w.bandwidth else res["iops"]
                        samples.append(Sample(repeat=repeat, server=name, workload=w.name,
                                              value=value, unit=w.unit, **res))
                        progress(f"  {w.name:<20} {fmt_value(value, w.unit):>10} {w.unit:<5}"
                                 f"  p99 {res['p99_us']:,.0f} µs")
                finally:
                    server.stop()
                sync_file(backing)

        med = medians(samples, args.server_list, args.workload_list)
        info["loadavg at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(report(samples, args.server_list, args.workload_list, med))
        print(f"\nloadavg at end: {info['loadavg at end']}")
        if digest is not None:
            live = source_digest(Path(args.mirrorpool_src) / "mirrorpool")
            if live != digest:
                print(f"note: {args.mirrorpool_src}/mirrorpool changed during the run (now "
                      f"sha256 {live[:16]}); the run used the snapshot taken at start")
        sys.stdout.flush()
        if args.json_out:
            doc: dict[str, Any] = {
                "command": command,
                "machine": info,
                "mirrorpool_source_sha256": digest,
                "config": {"runtime": args.runtime, "size": args.size, "repeat": args.repeat,
                           "servers": args.server_list,
                           "workloads": [asdict(w) for w in args.workload_list],
                           "mirrorpool_args": args.mirrorpool_args},
                "samples": [asdict(s) for s in samples],
                "medians": med,
            }
            Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")
        return 0
    finally:
        if fio is not None:
            fio.stop()
        for server in servers.values():
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
