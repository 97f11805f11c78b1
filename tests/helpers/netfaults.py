"""Link faults between two devices: a network namespace behind a veth pair, or a TCP proxy.

The namespace way needs root and iproute2: device B runs inside a namespace the test
made, reachable over a veth pair whose near end the test takes down and up (every
packet is lost meanwhile, as on a cut cable).  Where namespaces cannot be made,
``LinkProxy`` forwards a loopback port to B and can stall, drop or slow the stream.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

_serial = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def netns_available() -> bool:
    if os.geteuid() != 0:
        return False
    name = f"mpchk{os.getpid() % 100000}"
    try:
        _ip("netns", "add", name)
    except (OSError, subprocess.SubprocessError):
        return False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        _ip("netns", "del", name)
    return True


class VethLink:
    """A namespace reachable at ``remote_ip`` over a veth pair; cut() and restore() it."""

    def __init__(self) -> None:
        n = next(_serial)
        tag = f"{os.getpid() % 100000}x{n}"
        self.netns = f"mp{tag}"
        self.near = f"mpa{tag}"[:15]
        self.far = f"mpb{tag}"[:15]
        subnet = f"10.{200 + os.getpid() % 50}.{n % 250}"
        self.local_ip = f"{subnet}.1"
        self.remote_ip = f"{subnet}.2"

    def __enter__(self) -> VethLink:
        _ip("netns", "add", self.netns)
        try:
            _ip("link", "add", self.near, "type", "veth", "peer", "name", self.far)
            _ip("link", "set", self.far, "netns", self.netns)
            _ip("addr", "add", f"{self.local_ip}/24", "dev", self.near)
            _ip("link", "set", self.near, "up")
            _ip("-n", self.netns, "addr", "add", f"{self.remote_ip}/24", "dev", self.far)
            _ip("-n", self.netns, "link", "set", self.far, "up")
            _ip("-n", self.netns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def cut(self) -> None:
        _ip("link", "set", self.near, "down")

    def restore(self) -> None:
        _ip("link", "set", self.near, "up")

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _ip("link", "del", self.near)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _ip("netns", "del", self.netns)


class LinkProxy:
    """127.0.0.1:port -> target, with faults: stall, drop (reset and refuse), slow."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._refusing = False
        self.rate = 0  # bytes per second per direction; 0: no limit
        self._conns: list[socket.socket] = []
        self._pumps_done: dict[int, bool] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> LinkProxy:
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._flowing.set()
        self.drop()
        self._listener.close()
        for t in self._threads:
            t.join(5)

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def stall(self) -> None:
        """Stop moving bytes (connections stay open), as on a link that lost every packet."""
        self._flowing.clear()

    def resume(self) -> None:
        self._refusing = False
        self._flowing.set()

    def drop(self, refuse: bool = False) -> None:
        """Reset every connection; with ``refuse``, new ones too until resume()."""
        self._refusing = refuse
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            # the pumps close their own sockets: a socket closed under a thread still
            # using it can have its descriptor reused by the next connection
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                s.shutdown(socket.SHUT_RDWR)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            self._spawn(self._pump, client, server)
            self._spawn(self._pump, server, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.2)
        while not self._stop.is_set() and self._forward_once(src, dst):
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with self._lock:
            self._pumps_done[id(src)] = True
            both = self._pumps_done.get(id(dst), False)
            if both:
                self._conns = [c for c in self._conns if c not in (src, dst)]
        if both:  # the last of the pair's two pumps closes both sockets
            src.close()
            dst.close()


    def _forward_once(self, src: socket.socket, dst: socket.socket) -> bool:
        """Move what ``src`` has to ``dst``; False once either side is gone."""
        try:
            data = src.recv(65536)
        except TimeoutError:
            return True
        except OSError:
            return False
        if not data:
            return False
        for piece in _pieces(data, self.rate):
            while not self._flowing.wait(0.2):
                if self._stop.is_set():
                    return False
            try:
                dst.sendall(piece)
            except OSError:
                return False
            if self.rate:
                time.sleep(len(piece) / self.rate)
        return True


def _pieces(data: bytes, rate: int) -> Iterator[bytes]:
    step = max(1024, rate // 20) if rate else len(data)
    for i in range(0, len(data), step):
        yield data[i : i + step]
