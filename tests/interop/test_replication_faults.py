"""Link faults in the middle of a write burst with triggers in it (invariant 6).

Device B runs in a network namespace of the test's own, behind a veth pair that is
taken down and up again (every packet lost meanwhile); where namespaces cannot be
made, the same tests run through a TCP proxy that stalls or resets the stream.  A
second set always runs through the proxy: a slow link, and a link gone longer than
the device waits before it gives up journaling.

After each fault: B's LU equals A's, every trigger's generation on B equals A's for
the same trigger byte for byte, and in sync mode every acknowledged write is on B.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import pytest

from tests.helpers.netfaults import LinkProxy, VethLink, netns_available
from tests.helpers.processes import DeviceProcess
from tests.mirror_support import (
    MiB,
    api,
    assert_identical,
    assert_same_cut,
    close,
    link_status,
    lu_path,
    remote_gens,
    wait_caught_up,
    wait_until,
)

SIZE = 16 * MiB
BLOCK = 4096


@dataclass
class Link:
    """Two devices and a way to break the link between them."""

    a: DeviceProcess
    b: DeviceProcess
    cut: Callable[[], None]
    restore: Callable[[], None]
    add_args: list[str] = field(default_factory=list)
    proxy: LinkProxy | None = None


def _start_pair(tmp_path: Path, b_host: str = "127.0.0.1",
                netns: str | None = None) -> tuple[DeviceProcess, DeviceProcess]:
    a = DeviceProcess(data_dir=tmp_path / "a").start()
    b = DeviceProcess(data_dir=tmp_path / "b", host=b_host, netns=netns).start()
    return a, b


def _stop(*devices: DeviceProcess) -> None:
    for dev in devices:
        if dev.proc is not None and dev.proc.poll() is None:
            dev.stop()


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[Link]:
    a, b = _start_pair(tmp_path)
    with LinkProxy(("127.0.0.1", b.nbd_port)) as proxy:
        yield Link(a, b, proxy.stall, proxy.resume,
                   ["--nbd-address", f"127.0.0.1:{proxy.port}"], proxy)
    _stop(a, b)


@pytest.fixture(params=["netns", "proxy"])
def link(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Link]:
    """A cut link: a veth pair taken down where namespaces exist, else a stalled proxy."""
    if request.param == "proxy" or not netns_available():
        if request.param == "netns":
            pytest.skip("network namespaces need root and iproute2: the proxy case covers it")
        yield request.getfixturevalue("proxied")
        return
    with VethLink() as veth:
        a, b = _start_pair(tmp_path, veth.remote_ip, veth.netns)
        try:
            yield Link(a, b, veth.cut, veth.restore)
        finally:
            _stop(a, b)


class Burst:
    """4 KiB writes of unique data at random offsets, and a trigger every ``every`` writes."""

    def __init__(self, a: DeviceProcess, name: str, seed: int, every: int = 150,
                 max_triggers: int = 6) -> None:
        self.a, self.name = a, name
        self.rng = random.Random(seed)
        self.every, self.max_triggers = every, max_triggers
        self.acked: dict[int, bytes] = {}  # offset -> the last data acknowledged there
        self.triggers: list[dict] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Burst:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(60)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        h = nbd.NBD()
        try:
            h.connect_uri(self.a.uri(self.name))
            n = 0
            while not self.stop.is_set():
                n += 1
                offset = self.rng.randrange(SIZE // BLOCK) * BLOCK
                data = n.to_bytes(8, "little") * (BLOCK // 8)
                h.pwrite(data, offset)
                self.acked[offset] = data
                if n % self.every == 0 and len(self.triggers) < self.max_triggers:
                    answer = api(self.a, "POST", f"{lu_path(self.name)}/trigger",
                                 {"label": f"t{n}"})
                    self.triggers.append(answer)  # type: ignore[arg-type]
                time.sleep(0.0005)
        except BaseException as exc:  # reported by __exit__
            self.error = exc
        finally:
            close(h)


def _replicate(link: Link, name: str, *args: str) -> None:
    api(link.a, "POST", "/v1/lus", {"name": name, "size": SIZE, "pool": 8}, expect=201)
    link.a.cli("remote", "add", name, "--device", link.b.api, "--remote-pool", "8",
               "--link-timeout", "1.5", *link.add_args, *args)
    wait_caught_up(link.a, name, 60)


def _check_same(link: Link, name: str, burst: Burst, replicated_all: bool = True) -> None:
    wait_caught_up(link.a, name, 120)
    assert_identical(link.a.uri(name), link.b.uri(name))
    pairs = assert_same_cut(link.a, link.b, name)
    made = [t for t in burst.triggers]
    assert made, "the burst made no trigger"
    if replicated_all:
        # every trigger, including those made while the link was down, split B too
        assert pairs == len(made), (pairs, remote_gens(link.a, name))
        assert all(g["replicated"] for t in made for g in t["generations"])


def test_async_link_cut_mid_burst_splits_b_at_the_same_points(link: Link) -> None:
    _replicate(link, "r")
    with Burst(link.a, "r", seed=1) as burst:
        wait_until(lambda: len(burst.triggers) >= 2, 30, "two triggers before the cut")
        link.cut()
        try:
            # the link notices (no answer within --link-timeout) and says so
            wait_until(lambda: not link_status(link.a, "r")["connected"], 20,
                       "the link to report the cut")
            wait_until(lambda: len(burst.triggers) >= 4, 30, "two triggers during the cut")
            assert link_status(link.a, "r")["lag_seq"] > 0
        finally:
            link.restore()
        wait_until(lambda: len(burst.triggers) >= 6, 30, "triggers after the cut")
    _check_same(link, "r", burst)


def test_sync_link_cut_keeps_every_acknowledged_write_on_b(link: Link) -> None:
    _replicate(link, "s", "--mode", "sync", "--sync-timeout", "1")
    with Burst(link.a, "s", seed=2) as burst:
        wait_until(lambda: len(burst.acked) >= 200, 30, "writes before the cut")
        link.cut()
        try:
            wait_until(lambda: link_status(link.a, "s")["degraded"], 30,
                       "sync mode to stop waiting for B")
            time.sleep(1)
        finally:
            link.restore()
        wait_until(lambda: not link_status(link.a, "s")["degraded"], 60,
                   "sync mode to wait for B again")
        wait_until(lambda: len(burst.triggers) >= 6, 60, "triggers after the cut")
    _check_same(link, "s", burst)
    h = nbd.NBD()
    h.set_uri_allow_local_file(False)
    h.connect_uri(link.b.uri("s"))
    try:
        for offset, data in burst.acked.items():
            assert h.pread(BLOCK, offset) == data, f"acknowledged write at {offset} not on B"
    finally:
        close(h)


def test_slow_link_reset_link_and_a_link_gone_too_long(proxied: Link) -> None:
    link = proxied
    proxy = link.proxy
    assert proxy is not None
    _replicate(link, "g", "--give-up-after", "2")
    with Burst(link.a, "g", seed=3, every=100, max_triggers=1000) as burst:
        proxy.rate = 256 * 1024  # bytes per second: B lags, and the lag is reported
        wait_until(lambda: link_status(link.a, "g")["lag_seq"] > 50, 30, "a visible lag")
        proxy.rate = 0
        proxy.drop()  # connections reset: the link reconnects and resumes in order
        wait_until(lambda: len(burst.triggers) >= 3, 30, "triggers after the reset")
        proxy.drop(refuse=True)  # B unreachable longer than --give-up-after
        wait_until(lambda: link_status(link.a, "g")["state"] == "inconsistent", 30,
                   "the link to give up journaling")
        gone = len(burst.triggers)
        wait_until(lambda: len(burst.triggers) >= gone + 2, 30, "triggers while B is gone")
        proxy.resume()
        wait_until(lambda: link_status(link.a, "g")["state"] == "consistent", 60,
                   "the refresh to complete")
        back = len(burst.triggers)
        wait_until(lambda: len(burst.triggers) >= back + 2, 60, "triggers after B is back")
    _check_same(link, "g", burst, replicated_all=False)
    flags = [g["replicated"] for t in burst.triggers for g in t["generations"]]
    # answered while B was gone: not replicated, and said so; after: replicated again
    assert flags[gone + 1 : gone + 2] == [False], flags
    assert flags[-1] is True, flags
    status = link_status(link.a, "g")
    assert status["triggers_not_replicated"] >= 1


def test_strict_sync_link_holds_a_write_until_b_has_it(proxied: Link) -> None:
    """--sync-timeout 0: a write is answered only once B answered it, however long."""
    link = proxied
    assert link.proxy is not None
    _replicate(link, "z", "--mode", "sync", "--sync-timeout", "0")
    h = nbd.NBD()
    h.connect_uri(link.a.uri("z"))
    done = threading.Event()
    block = b"\x5a" * BLOCK

    def write() -> None:
        h.pwrite(block, 2 * BLOCK)
        done.set()

    link.proxy.stall()
    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert not done.wait(3), "answered while B could not have it"
        assert not link_status(link.a, "z")["degraded"]
    finally:
        link.proxy.resume()
    assert done.wait(60)
    writer.join()
    close(h)
    hb = nbd.NBD()
    hb.connect_uri(link.b.uri("z"))
    try:
        assert hb.pread(BLOCK, 2 * BLOCK) == block
    finally:
        close(hb)
