"""Pieces shared by the mirror benchmarks (mirror_compare, trigger_load, resync_cost).

Built on bench/fio_compare.py: the same server life cycle (started and stopped
by PID, in a session of their own), the same machine facts, the same snapshot
of the mirrorpool source.  This module adds a mirrored mirrorpool LU (pool N,
waiting until its active backup is in sync), a small JSON client for the
control API, qemu-storage-daemon with a mirror job driven over QMP, fio runs
with latency percentiles, and the header every result file starts with.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fio_compare import (
    LU_NAME,
    REPO,
    MirrorpoolServer,
    Server,
    first_line,
    free_port,
    machine_info,
    mirrorpool_launcher,
    stop_process,
    sync_file,
    tail,
    wait_for_port,
)

UNIT = 64 * 1024  # the unit in which the benchmarks change data (64 KiB, aligned)
START_TIMEOUT = 30.0


# ---------------------------------------------------------------- small helpers


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank on the sorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def add_source_args(p: argparse.ArgumentParser) -> None:
    """The options mirrorpool_launcher (from fio_compare) reads."""
    p.add_argument("--mirrorpool-src", default=str(REPO / "src"),
                   help="directory holding the mirrorpool package; it is copied when the run "
                        "starts and the copy is what runs (default: this checkout's src)")
    p.add_argument("--mirrorpool-bin", default=None,
                   help="run this mirrorpool executable as it is instead (no snapshot)")
    p.add_argument("--mirrorpool-args", default="",
                   help="extra arguments for `mirrorpool serve`, e.g. \"--workers 2\"")
    p.add_argument("--fio", default="fio", help="the fio executable")
    p.add_argument("--tmpdir", default=None, help="where to make the temporary directory")
    p.add_argument("--json-out", default=None, help="also write every result to this file")


def check_tools(p: argparse.ArgumentParser, args: argparse.Namespace, tools: list[str]) -> None:
    if args.mirrorpool_bin is not None:
        tools = [*tools, args.mirrorpool_bin]
    elif not (Path(args.mirrorpool_src) / "mirrorpool" / "__main__.py").is_file():
        p.error(f"--mirrorpool-src {args.mirrorpool_src} holds no mirrorpool package")
    for tool in tools:
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed or not on PATH")


def header(command: str, args: argparse.Namespace, tmp: Path,
           extra: dict[str, str]) -> tuple[dict[str, str], list[str], dict[str, str], str | None]:
    """Print the run's header; returns machine facts, the mirrorpool launcher and env, digest."""
    info = machine_info(args.fio, tmp)
    info["qemu-storage-daemon"] = first_line(["qemu-storage-daemon", "--version"])
    launcher, env, info["mirrorpool"], digest = mirrorpool_launcher(args, tmp)
    print(f"command: {command}")
    print(f"cwd: {os.getcwd()}")
    for k, v in {**info, **extra}.items():
        print(f"{k}: {v}")
    print(flush=True)
    return info, launcher, env, digest


# ---------------------------------------------------------------- control API


class ApiError(RuntimeError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class Api:
    """JSON over one kept-alive HTTP connection; one instance per thread."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        return self.conn

    def request(self, method: str, path: str, body: Any = None) -> Any:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if payload is not None else {}
        for attempt in (1, 2):
            conn = self._connect()
            try:
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt == 2:
                    raise
        if resp.status >= 400:
            try:
                detail = json.loads(data).get("detail", data.decode(errors="replace"))
            except ValueError:
                detail = data.decode(errors="replace")
            raise ApiError(resp.status, str(detail))
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, {} if body is None else body)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ---------------------------------------------------------------- mirrored mirrorpool


@dataclass
class MirroredMirrorpool(MirrorpoolServer):
    """mirrorpool with one LU of pool ``pool``; start() returns once its backup is in sync.

    With ``use_backing`` the LU is the (pre-filled) backing file, like fio_compare's;
    otherwise an internal sparse file of ``size`` bytes in the data directory.
    """

    pool: int = 3
    use_backing: bool = True
    sync_timeout: float = 600.0
    api: Api | None = None
    data_dir: Path | None = None
    sync_s: list[float] = field(default_factory=list)

    def command(self) -> list[str]:
        cmd = super().command()
        # JSON log lines carry exact times (resync start and end are read from them)
        return cmd if "--log-format" in cmd else [*cmd, "--log-format", "json"]

    def start(self) -> None:
        self.starts += 1
        self.port = free_port()
        self.api_port = free_port()
        self.data_dir = self.workdir / f"mirrorpool-data-{self.starts}"
        self._spawn(self.command(), self.env)
        assert self.proc is not None
        wait_for_port(self.api_port, self.proc, "mirrorpool (control API)")
        wait_for_port(self.port, self.proc, "mirrorpool (NBD)")
        env = {**(self.env or os.environ), "MIRRORPOOL_API": f"http://127.0.0.1:{self.api_port}"}
        create = [*self.launcher, "lu", "create", LU_NAME, "--size", str(self.size),
                  "--pool", str(self.pool)]
        if self.use_backing:
            create += ["--backing", str(self.backing)]
        out = subprocess.run(create, capture_output=True, text=True, env=env, cwd=self.workdir,
                             timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{shlex.join(create)} failed: {out.stderr or out.stdout}")
        self.api = Api(self.api_port)
        self.wait_in_sync(self.sync_timeout)
        chosen = self.log_events("active backup chosen")
        done = self.log_events("backup in sync")
        if chosen and done:
            self.sync_s.append(done[-1]["time"] - chosen[0]["time"])

    def mirror(self) -> dict[str, Any]:
        assert self.api is not None
        return self.api.get(f"/v1/lus/{LU_NAME}")["mirror"]

    def trigger(self, api: Api | None = None) -> tuple[dict[str, Any], float]:
        """POST a trigger; its answer and the round trip as the client saw it (s)."""
        api = api or self.api
        assert api is not None
        t0 = time.monotonic()
        answer = api.post(f"/v1/lus/{LU_NAME}/trigger", {"label": "bench"})
        return answer, time.monotonic() - t0

    def wait_in_sync(self, timeout: float, poll: float = 0.01) -> tuple[float, dict[str, Any]]:
        """Poll until the active backup is in sync; (seconds waited, last mirror state)."""
        t0 = time.monotonic()
        while True:
            self.check_alive()
            mirror = self.mirror()
            if mirror["active_state"] == "in-sync":
                return time.monotonic() - t0, mirror
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"mirrorpool not in sync after {timeout:.0f}s: {mirror}")
            time.sleep(poll)

    def files(self) -> list[Path]:
        """Every data file: the primary and the pool members (for fsync between runs)."""
        out = [self.backing] if self.use_backing else []
        if self.data_dir is not None and (self.data_dir / "lu").is_dir():
            out += sorted((self.data_dir / "lu").glob("*.img"))
        return out

    def log_events(self, message: str) -> list[dict[str, Any]]:
        """Lines of the server's JSON log (--log-format json) with this message."""
        out = []
        if self.log_path is None:
            return out
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            for line in f:
                if message in line and line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        doc = json.loads(line)
                        if doc.get("message") == message:
                            out.append(doc)
        return out

    def stop(self) -> None:
        if self.api is not None:
            self.api.close()
            self.api = None
        super().stop()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class LogTail:
    """Follows a JSON-lines log from its current end, without asking the server anything."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size
        self.partial = b""
        self.lines: list[dict[str, Any]] = []

    def poll(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        for line in complete:
            if line.startswith(b"{"):
                with contextlib.suppress(ValueError):
                    self.lines.append(json.loads(line))

    def find(self, message: str, **fields: Any) -> dict[str, Any] | None:
        for doc in self.lines:
            if doc.get("message") == message and all(doc.get(k) == v for k, v in fields.items()):
                return doc
        return None

    def wait(self, message: str, timeout: float, interval: float = 0.005,
             **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            doc = self.find(message, **fields)
            if doc is not None:
                return doc
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {message!r} {fields} in {self.path} after {timeout:.0f}s")
            time.sleep(interval)


def tracking_chunk(api: Api, lu: str = LU_NAME) -> int:
    """mirrorpool's change-tracking (and resync) granularity, in bytes, as its API says:
    the ``chunk_size`` of a diff against a live generation (the LU needs one)."""
    gens = api.get(f"/v1/lus/{lu}/backups")
    if not gens:
        raise RuntimeError(f"LU {lu} has no generation to ask its chunk size with")
    return int(api.get(f"/v1/lus/{lu}/diff?from={gens[0]['gen']}")["chunk_size"])


def sync_files(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            sync_file(path)


# ---------------------------------------------------------------- qemu-storage-daemon


class QmpError(RuntimeError):
    pass


class Qmp:
    """A minimal QMP client: commands in order, events collected as they come."""

    def __init__(self, path: Path, timeout: float = START_TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.events: list[tuple[float, dict[str, Any]]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise QmpError("QMP connection closed")
        return json.loads(line)

    def command(self, execute: str, /, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            doc = self._read()
            if "event" in doc:
                self.events.append((time.monotonic(), doc))
                continue
            if "error" in doc:
                raise QmpError(f"{execute}: {doc['error'].get('desc', doc['error'])}")
            return doc.get("return")

    def wait_event(self, names: Sequence[str], timeout: float) -> tuple[float, dict[str, Any]]:
        """The first event named in ``names`` (already received or to come): (time, event)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for when, doc in self.events[seen:]:
                if doc["event"] in names:
                    self.events.remove((when, doc))
                    return when, doc
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"no {'/'.join(names)} event after {timeout:.0f}s")
            self.sock.settimeout(left)
            try:
                doc = self._read()
            finally:
                self.sock.settimeout(START_TIMEOUT)
            if "event" in doc:
                self.events.append((time.monotonic(), doc))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


@dataclass
class QsdMirrorServer(Server):
    """qemu-storage-daemon exporting the backing file over NBD, mirrored (write-blocking)
    to a second raw file; both through the page cache (cache.direct=false)."""

    qmp: Qmp | None = None
    target: Path | None = None
    ready_s: list[float] = field(default_factory=list)
    mirror_active: bool = False

    @property
    def sock_path(self) -> Path:
        return self.workdir / f"qsd-{self.starts}.qmp"

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{LU_NAME}"

    def command(self) -> list[str]:
        return ["qemu-storage-daemon", "--chardev",
                f"socket,id=qmp,path={self.sock_path},server=on,wait=off",
                "--monitor", "chardev=qmp"]

    def start(self) -> None:
        self.starts += 1
        self.port = free_port()
        self.target = self.workdir / f"qsd-target-{self.starts}.img"
        with open(self.target, "wb") as f:
            f.truncate(self.size)  # sparse; the mirror's full sync fills it
        self._spawn(self.command())
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu-storage-daemon exited with {self.proc.returncode}:\n"
                                   f"{tail(self.log_path) if self.log_path else ''}")
            try:
                self.qmp = Qmp(self.sock_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise RuntimeError("qemu-storage-daemon: no QMP socket") from None
                time.sleep(0.05)
        q = self.qmp
        q.command("blockdev-add", driver="file", filename=str(self.backing),
                  cache={"direct": False}, **{"node-name": "src"})
        q.command("blockdev-add", driver="file", filename=str(self.target),
                  cache={"direct": False}, **{"node-name": "tgt"})
        self.start_mirror()
        q.command("nbd-server-start",
                  addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(self.port)}})
        q.command("block-export-add", type="nbd", id="exp", name=LU_NAME, writable=True,
                  **{"node-name": "src"})
        wait_for_port(self.port, self.proc, "qemu-storage-daemon (NBD)")

    def start_mirror(self, timeout: float = 600.0) -> float:
        """blockdev-mirror sync=full copy-mode=write-blocking; seconds until BLOCK_JOB_READY."""
        assert self.qmp is not None
        t0 = time.monotonic()
        self.qmp.command("blockdev-mirror", device="src", target="tgt", sync="full",
                         **{"job-id": "mirror", "copy-mode": "write-blocking"})
        when, _ = self.qmp.wait_event(["BLOCK_JOB_READY"], timeout)
        self.mirror_active = True
        self.ready_s.append(when - t0)
        return when - t0

    def split(self) -> tuple[float, str]:
        """block-job-cancel on the ready mirror: (seconds from command to the job's end
        event, that event's name).  On a ready mirror QEMU ends the job with
        BLOCK_JOB_COMPLETED (the target is then a point-in-time copy), not CANCELLED."""
        assert self.qmp is not None
        t0 = time.monotonic()
        self.qmp.command("block-job-cancel", device="mirror")
        when, doc = self.qmp.wait_event(["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"], 60)
        self.mirror_active = False
        if doc["data"].get("error"):
            raise RuntimeError(f"mirror job ended with an error: {doc}")
        return when - t0, doc["event"]

    def files(self) -> list[Path]:
        return [self.backing, *([self.target] if self.target else [])]

    def stop(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        super().stop()
        for path in (self.target, self.sock_path):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self.target = None


# ---------------------------------------------------------------- fio


def fio_doc(path: Path) -> dict[str, Any]:
    text = path.read_text(errors="replace")
    start = text.find("{")
    if start < 0:
        raise RuntimeError(f"no JSON in fio output {path}:\n{text[-2000:]}")
    doc, _ = json.JSONDecoder().raw_decode(text, start)
    return doc


def percentile_of(side: dict[str, Any], q: float) -> float:
    """fio's clat percentile q in µs (NaN when fio did not report it)."""
    table = side.get("clat_ns", {}).get("percentile", {})
    for k, v in table.items():
        if abs(float(k) - q) < 1e-6:
            return float(v) / 1000.0
    return float("nan")


class Fio:
    """Runs fio in a session of its own, one at a time, and stops it by PID."""

    def __init__(self, fio: str, outdir: Path, prefix: list[str] | None = None) -> None:
        self.fio = fio
        self.prefix = prefix or []  # e.g. taskset, to pin fio to CPUs
        self.outdir = outdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.count = 0
        self.cmd: list[str] = []
        self.out: Path | None = None
        self.log: Path | None = None

    def start(self, name: str, uri: str, options: list[str]) -> None:
        self.count += 1
        self.out = self.outdir / f"fio-{self.count:03d}-{name}.json"
        self.log = self.outdir / f"fio-{self.count:03d}.log"
        self.cmd = [*self.prefix, self.fio, f"--name={name}", "--ioengine=nbd", f"--uri={uri}",
                    "--numjobs=1", *options, "--output-format=json", f"--output={self.out}"]
        with open(self.log, "wb") as lf:
            self.proc = subprocess.Popen(self.cmd, stdout=lf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.out is not None and self.log is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            raise RuntimeError(f"fio timed out: {shlex.join(self.cmd)}") from None
        finally:
            self.proc = None
        if code != 0:
            raise RuntimeError(f"fio exited with {code}: {shlex.join(self.cmd)}\n{tail(self.log)}")
        doc = fio_doc(self.out)
        job = doc["jobs"][0]
        if job.get("error"):
            raise RuntimeError(f"fio job failed with error {job['error']}: {shlex.join(self.cmd)}")
        return doc

    def run(self, name: str, uri: str, options: list[str], timeout: float) -> dict[str, Any]:
        self.start(name, uri, options)
        return self.wait(timeout)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def write_side(doc: dict[str, Any]) -> dict[str, Any]:
    side = doc["jobs"][0]["write"]
    if not side.get("total_ios"):
        raise RuntimeError("fio did no writes")
    return side


def dump_json(path: str | None, doc: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


def exit_note(src: str, digest: str | None) -> None:
    from fio_compare import source_digest

    print(f"\nloadavg at end: {loadavg()}")
    if digest is not None:
        live = source_digest(Path(src) / "mirrorpool")
        if live != digest:
            print(f"note: {src}/mirrorpool changed during the run (now sha256 {live[:16]}); "
                  "the run used the snapshot taken at start")
    sys.stdout.flush()
