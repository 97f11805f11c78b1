"""Failing disks, through a real NBD client (libnbd): what the host sees and what follows."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.helpers.processes import DeviceProcess

MIB = 1 << 20


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceProcess]:
    root: Path = tmp_path_factory.mktemp("faulty")
    dev = DeviceProcess(data_dir=root / "data", extra_args=["--fault-injection"]).start()
    yield dev
    dev.stop()


def inject(dev: DeviceProcess, lu: str, **rule: object) -> None:
    status, body = dev.request("POST", f"/v1/lus/{lu}/faults", rule)
    assert status == 201, body


def clear(dev: DeviceProcess, lu: str) -> None:
    assert dev.request("DELETE", f"/v1/lus/{lu}/faults")[0] == 204


def connect(dev: DeviceProcess, export: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(dev.uri(export))
    return h


def mirror(dev: DeviceProcess, lu: str) -> dict:
    status, body = dev.request("GET", f"/v1/lus/{lu}")
    assert status == 200
    return body["mirror"]  # type: ignore[index]


def wait_in_sync(dev: DeviceProcess, lu: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = mirror(dev, lu)
        if m["active_state"] == "in-sync":
            return m
        time.sleep(0.05)
    raise AssertionError(f"{lu} not in sync: {mirror(dev, lu)}")


def host_errno(fn) -> int:  # type: ignore[no-untyped-def]
    try:
        fn()
    except nbd.Error as exc:
        code = exc.errno  # libnbd gives the name, e.g. "EIO"
        return getattr(errno, code) if isinstance(code, str) else (code or -1)
    return 0


@pytest.mark.parametrize(("effect", "expected"), [("eio", errno.EIO), ("enospc", errno.ENOSPC),
                                                  ("short", errno.EIO)])
def test_primary_write_error_reaches_the_host(faulty: DeviceProcess, effect: str,
                                              expected: int) -> None:
    lu = faulty.create_lu("4M", pool=2)
    h = connect(faulty, lu)
    h.pwrite(b"\x11" * 65536, 0)
    inject(faulty, lu, target="primary", op="write", effect=effect, times=1)
    assert host_errno(lambda: h.pwrite(b"\x22" * 65536, 0)) == expected
    clear(faulty, lu)
    # the device goes on serving, and the LU is usable
    h.pwrite(b"\x33" * 4096, MIB)
    assert h.pread(4096, MIB) == b"\x33" * 4096
    if effect != "short":  # a refused write leaves the old data
        assert h.pread(65536, 0) == b"\x11" * 65536
    h.shutdown()


def test_flush_error_reaches_the_host(faulty: DeviceProcess) -> None:
    lu = faulty.create_lu("4M", pool=0)
    h = connect(faulty, lu)
    h.pwrite(b"\x44" * 4096, 0)
    inject(faulty, lu, target="primary", op="flush", effect="eio", times=1)
    assert host_errno(h.flush) == errno.EIO
    clear(faulty, lu)
    h.flush()
    h.shutdown()


def test_backup_failure_never_fails_the_host(faulty: DeviceProcess) -> None:
    lu = faulty.create_lu("4M", pool=3)
    wait_in_sync(faulty, lu)
    first_active = mirror(faulty, lu)["active_member"]
    inject(faulty, lu, target="active", op="write", effect="eio")
    h = connect(faulty, lu)
    h.pwrite(b"\x55" * 65536, 0)  # succeeds although the backup write fails
    m = mirror(faulty, lu)
    states = {x["member"]: x["state"] for x in m["members"]}
    assert states[first_active] == "failed"
    assert m["active_member"] != first_active  # a spare took over and resyncs
    status, metrics = faulty.request("GET", "/v1/status")
    text = _metrics(faulty)
    assert f'mirrorpool_member_failures_total{{lu="{lu}"}} 1.0' in text
    assert f'mirrorpool_pool_members{{lu="{lu}",state="failed"}} 1.0' in text
    clear(faulty, lu)
    wait_in_sync(faulty, lu)
    # a backup made now is exact
    h.pwrite(b"\x66" * 4096, 2 * MIB)
    status, answer = faulty.request("POST", f"/v1/lus/{lu}/trigger", {"label": "after"})
    assert status == 200, answer
    gen = answer["generations"][0]["gen"]  # type: ignore[index]
    g = connect(faulty, f"{lu}@{gen}")
    assert g.pread(65536, 0) == b"\x55" * 65536
    assert g.pread(4096, 2 * MIB) == b"\x66" * 4096
    g.shutdown()
    h.shutdown()


def test_failed_member_is_repaired(faulty: DeviceProcess) -> None:
    lu = faulty.create_lu("2M", pool=1)  # one member: no spare to take over
    wait_in_sync(faulty, lu)
    inject(faulty, lu, target="active", op="write", effect="eio")
    h = connect(faulty, lu)
    h.pwrite(b"\x77" * 4096, 0)
    assert mirror(faulty, lu)["active_state"] == "unmirrored"
    clear(faulty, lu)
    status, body = faulty.request("POST", f"/v1/lus/{lu}/repair")
    assert status == 200, body
    m = wait_in_sync(faulty, lu)
    assert m["active_member"] is not None
    h.shutdown()


def test_incomplete_generation_is_never_offered(faulty: DeviceProcess) -> None:
    lu = faulty.create_lu("4M", pool=3)
    wait_in_sync(faulty, lu)
    h = connect(faulty, lu)
    h.pwrite(b"\x01" * MIB, 0)
    # the first trigger starts a resync of the next member; hold it back by failing its writes
    status, first = faulty.request("POST", f"/v1/lus/{lu}/trigger", {})
    assert status == 200
    nxt = mirror(faulty, lu)["active_member"]
    inject(faulty, lu, target=f"member:{nxt}", op="write", effect="eio")
    h.pwrite(b"\x02" * MIB, 0)
    status, second = faulty.request("POST", f"/v1/lus/{lu}/trigger", {})
    gens = [g["gen"] for g in faulty.request("GET", f"/v1/lus/{lu}/backups")[1]]  # type: ignore[union-attr]
    if status == 200:
        made = second["generations"][0]["gen"]  # type: ignore[index]
        if made in gens:  # if it is listed, it must be exact
            g = connect(faulty, f"{lu}@{made}")
            assert g.pread(MIB, 0) == b"\x02" * MIB
            g.shutdown()
    status, body = faulty.request("GET", f"/v1/lus/{lu}/backups")
    assert all(x["state"] in ("ready", "syncing") for x in body)  # type: ignore[union-attr]
    clear(faulty, lu)
    h.shutdown()


def test_slow_backup_delays_but_serves(faulty: DeviceProcess) -> None:
    lu = faulty.create_lu("2M", pool=2)
    wait_in_sync(faulty, lu)
    inject(faulty, lu, target="active", op="write", effect="delay", delay=0.5, times=1,
           offset=0, length=4096)
    h = connect(faulty, lu)
    other = connect(faulty, lu)
    started = time.monotonic()
    h.aio_pwrite(b"\x09" * 4096, 0)
    other.pwrite(b"\x0a" * 4096, MIB)  # a disjoint write does not wait for the slow one
    assert time.monotonic() - started < 0.4
    while h.aio_in_flight():
        h.poll(1)
    assert h.pread(4096, 0) == b"\x09" * 4096
    clear(faulty, lu)
    h.shutdown()
    other.shutdown()


def test_fault_injection_is_off_by_default(device: DeviceProcess) -> None:
    lu = device.create_lu("1M", pool=0)
    status, body = device.request("POST", f"/v1/lus/{lu}/faults", {"target": "primary"})
    assert status == 403
    assert "--fault-injection" in body["detail"]  # type: ignore[index]


def _metrics(dev: DeviceProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(dev.api + "/metrics", timeout=10) as resp:
        return resp.read().decode()
