"""Fixtures for the interop tests: more exports of the same kind as `target`."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import Target, need
from tests.helpers.processes import DeviceProcess, NbdkitProcess

_counter = itertools.count(1)


@pytest.fixture
def make_export(target: Target, device: DeviceProcess) -> Iterator[Callable[[int], Target]]:
    """Make another export of `size` bytes on the same kind of server as `target`.

    mirrorpool makes an LU on the session device; nbdkit starts another
    `nbdkit memory` on a free loopback port.  All are removed afterwards.
    """
    lus: list[str] = []
    kits: list[NbdkitProcess] = []

    def make(size: int) -> Target:
        if target.kind == "mirrorpool":
            # The control API straight away: the CLI costs a second or more per call.
            name = f"interop-{os.getpid()}-{next(_counter)}"
            status, body = device.request("POST", "/v1/lus", {"name": name, "size": size,
                                                              "pool": 0})
            assert status == 201, body
            lus.append(name)
            return Target("mirrorpool", device.uri(name), size)
        need("nbdkit")
        kit = NbdkitProcess(["memory", str(size)]).start()
        kits.append(kit)
        return Target("nbdkit", kit.uri(), size)

    yield make
    for kit in kits:
        kit.stop()
    for name in lus:
        status, body = device.request("DELETE", f"/v1/lus/{name}?force=true")
        assert status == 204, body
