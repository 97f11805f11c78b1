"""A device restarting with a replication link: what it numbers next."""

from __future__ import annotations

from pathlib import Path

from mirrorpool.device.device import Device
from mirrorpool.replication.journal import Kind, Record, ReplicationJournal
from mirrorpool.replication.link import CONSISTENT


def test_numbers_after_a_restart_stay_above_the_journal_and_the_remote_copy(
    tmp_path: Path,
) -> None:
    """After a crash the volume numbers from its last saved point plus a margin, which
    a busy LU may have passed.  A record numbered at or below one already in the
    journal would be taken as written (and never put on file) or as sent."""
    data = str(tmp_path / "data")
    device = Device(data)
    lu = device.create_lu("x", 1 << 20, pool=1)
    journal_dir = device.remotes._journal_dir(lu)
    device.close()
    high = 5_000_000
    journal = ReplicationJournal(journal_dir, 1 << 30)
    journal.append(Record(Kind.WRITE, high, 0, 4096, b"\x01" * 4096))
    journal.close()
    catalog_device = Device(data)
    # unreachable on purpose: the link keeps trying in the background
    catalog_device.catalog.save_replica("x", "http://127.0.0.1:9", "nbd://127.0.0.1:9/x",
                                        "x", "async", 1 << 30, high - 10, CONSISTENT,
                                        None, "{}")
    catalog_device.close()
    device = Device(data)
    try:
        assert device.get_lu("x").volume.seq.next_seq > high
    finally:
        device.close()
