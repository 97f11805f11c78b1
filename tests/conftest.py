"""Shared fixtures: a real device process, and reference NBD servers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.processes import DeviceProcess, NbdkitProcess

# Debian's interpreter first: nbdsh runs `python3 -m nbd`, importable only there.
os.environ["PATH"] = "/usr/bin:" + os.environ.get("PATH", "")


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"missing programs in CI: {missing}")
        pytest.skip(f"missing programs: {missing}")


@pytest.fixture(scope="session")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceProcess]:
    """One device for the session; tests make their own LUs on it."""
    root = tmp_path_factory.mktemp("device")
    dev = DeviceProcess(data_dir=root / "data", unix_socket=root / "nbd.sock").start()
    yield dev
    dev.stop()


@pytest.fixture
def fresh_device(tmp_path: Path) -> Iterator[DeviceProcess]:
    """A device of the test's own, for restarts and start-up checks."""
    dev = DeviceProcess(data_dir=tmp_path / "data")
    yield dev
    if dev.proc is not None:
        dev.stop()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[DeviceProcess, DeviceProcess]]:
    """Two devices of the test's own, A and B, for replication from A to B."""
    a = DeviceProcess(data_dir=tmp_path / "a").start()
    b = DeviceProcess(data_dir=tmp_path / "b").start()
    yield a, b
    for dev in (a, b):
        if dev.proc is not None and dev.proc.poll() is None:
            dev.stop()


@dataclass
class Target:
    """An NBD export under test: a mirrorpool LU, or nbdkit as the calibration server."""

    kind: str
    uri: str
    size: int
    # the server's state for a failure message: nbdkit's exit status and stderr
    server_state: Callable[[], str] | None = None


@pytest.fixture(params=["mirrorpool", "nbdkit"])
def target(request: pytest.FixtureRequest, device: DeviceProcess) -> Iterator[Target]:
    size = 64 * 1024 * 1024
    if request.param == "mirrorpool":
        name = device.create_lu("64M", pool=0)
        yield Target("mirrorpool", device.uri(name), size)
        device.delete_lu(name)
    else:
        need("nbdkit")
        kit = NbdkitProcess(["memory", str(size)]).start()
        yield Target("nbdkit", kit.uri(), size, kit.state)
        kit.stop()
