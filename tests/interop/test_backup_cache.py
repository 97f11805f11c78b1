"""A backup filled by a bulk copy does not keep that copy in the page cache.

The copy writes big runs, which the kernel caches as large folios; every later
4 KiB host write mirrored into such a folio costs several times a write into a
small one.  Once the copy is done the device writes the member back and drops
its cache, so mirrored writes start from small folios.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbd
import pytest

from mirrorpool.device.volumes import member_path
from tests.helpers.processes import DeviceProcess
from tests.mirror_support import MiB, wait_in_sync, wait_until
from tests.unit.test_file_store import on_tmpfs, resident_bytes


def test_a_bulk_copied_backup_is_dropped_from_the_cache(device: DeviceProcess,
                                                        tmp_path: Path) -> None:
    if on_tmpfs(device.data_dir):
        pytest.skip("tmpfs pages live only in memory: there is no cache to drop")
    backing = tmp_path / "backing.img"
    data = os.urandom(16 * MiB)
    backing.write_bytes(data)
    status, body = device.request("POST", "/v1/lus", {"name": "cachedrop", "size": "16M",
                                                       "pool": 1, "backing": str(backing)})
    assert status == 201, body
    try:
        wait_in_sync(device, "cachedrop", timeout=30)
        _, lu = device.request("GET", "/v1/lus/cachedrop")
        member = Path(member_path(str(device.data_dir), lu["uuid"], 0))  # type: ignore[index]
        wait_until(lambda: resident_bytes(member) == 0, 20,
                   "the copied backup to leave the page cache")
        assert member.read_bytes() == data
        # mirrored writes still reach it
        h = nbd.NBD()
        h.connect_uri(device.uri("cachedrop"))
        h.pwrite(b"\x5a" * 4096, 8 * MiB)
        h.flush()
        h.shutdown()
        with open(member, "rb") as f:
            f.seek(8 * MiB)
            assert f.read(4096) == b"\x5a" * 4096
    finally:
        device.delete_lu("cachedrop")
