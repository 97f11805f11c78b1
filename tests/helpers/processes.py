"""Start and stop real server processes for tests: loopback only, stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

VENV_BIN = Path(sys.executable).parent
MIRRORPOOL = str(VENV_BIN / "mirrorpool")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20,
                  host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def stop_pid(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


@dataclass
class DeviceProcess:
    """A `mirrorpool serve` subprocess on free loopback ports (or in a test's netns)."""

    data_dir: Path
    nbd_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    unix_socket: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    netns: str | None = None  # run it in this network namespace (made by the test)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    _counter: int = 0

    @property
    def api(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    def uri(self, export: str) -> str:
        return f"nbd://{self.host}:{self.nbd_port}/{export}"

    def start(self, attempts: int = 3) -> DeviceProcess:
        """Start it; if a free port was taken meanwhile by someone else, try new ones."""
        for attempt in range(attempts):
            try:
                return self._start_once()
            except RuntimeError:
                if attempt + 1 == attempts or "Address already in use" not in self.log_text():
                    raise
                self.nbd_port, self.api_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> DeviceProcess:
        args = [
            *(["ip", "netns", "exec", self.netns] if self.netns else []),
            MIRRORPOOL, "serve", "--data", str(self.data_dir),
            "--listen", f"{self.host}:{self.nbd_port}", "--api", f"{self.host}:{self.api_port}",
            *self.extra_args,
        ]
        if self.unix_socket:
            args += ["--unix", str(self.unix_socket)]
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-serve.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for_port(self.api_port, self.proc, host=self.host)
        wait_for_port(self.nbd_port, self.proc, host=self.host)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        return stop_pid(self.proc, sig)

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "MIRRORPOOL_API": self.api}
        result = subprocess.run([MIRRORPOOL, *args], capture_output=True, text=True, env=env,
                                timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"mirrorpool {' '.join(args)} failed: {result.stderr}")
        return result

    def request(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def create_lu(self, size: str = "64M", pool: int = 0, name: str | None = None) -> str:
        """Made through the API (fast); the CLI has tests of its own."""
        if name is None:
            self._counter += 1
            name = f"lu{self._counter}-{os.getpid()}"
        status, body = self.request("POST", "/v1/lus", {"name": name, "size": size, "pool": pool})
        if status != 201:
            raise AssertionError(f"creating LU {name} failed: {status} {body}")
        return name

    def delete_lu(self, name: str) -> None:
        status, body = self.request("DELETE", f"/v1/lus/{name}?force=true")
        if status != 204:
            raise AssertionError(f"deleting LU {name} failed: {status} {body}")


@dataclass
class NbdkitProcess:
    """`nbdkit memory` (or any plugin) on a free loopback port, as a reference server."""

    plugin_args: list[str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    # nbdkit's own messages, kept so that a failing test can tell what nbdkit saw
    _stderr: IO[bytes] | None = None

    def start(self, attempts: int = 3) -> NbdkitProcess:
        for _ in range(attempts):
            if self._stderr is not None:
                self._stderr.close()
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(
                ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(self.port), *self.plugin_args],
                stdout=subprocess.DEVNULL, stderr=self._stderr,
            )
            wait_for_port(self.port, self.proc)
            # the port may have answered for someone else: nbdkit must still be running
            time.sleep(0.1)
            if self.proc.poll() is None:
                return self
            self.port = free_port()
        raise RuntimeError("nbdkit did not stay up on a free port")

    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"

    def state(self) -> str:
        """Whether nbdkit still runs, and what it wrote to stderr (for failure messages)."""
        if self.proc is None:
            return "nbdkit not started"
        code = self.proc.poll()
        said = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            said = self._stderr.read()[-4000:].decode(errors="replace").strip()
        running = "running" if code is None else f"exited with status {code}"
        return f"nbdkit pid {self.proc.pid} {running}; stderr: {said or '(nothing)'}"

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
