"""A replication journal that can no longer be written, seen from the host's writes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from mirrorpool.device.device import Device, LogicalUnit
from mirrorpool.device.exports import PrimaryExport
from mirrorpool.nbd.codec import Command
from mirrorpool.nbd.constants import Cmd
from mirrorpool.replication.journal import ReplicationJournal
from mirrorpool.replication.link import CONSISTENT, INCONSISTENT, RemoteConfig, Replicator
from mirrorpool.store import StoreError

BLOCK = 4096


def _write(export: PrimaryExport, offset: int) -> None:
    payload = memoryview(bytes([offset // BLOCK % 251 + 1]) * BLOCK)
    ticket = export.admit(Command(0, Cmd.WRITE, 1, offset, BLOCK, BLOCK), payload)
    export.write(ticket, payload, offset, False)


def _link(device: Device, lu: LogicalUnit, tmp_path: Path,
          saved: list[str] | None = None) -> tuple[ReplicationJournal, Replicator]:
    """A replication journal and link for ``lu``, never started: nothing is sent."""
    journal = ReplicationJournal(str(tmp_path / "journal"), 1 << 30)
    config = RemoteConfig(lu="x", device="", nbd="", remote="x", state=CONSISTENT)
    record = saved if saved is not None else []
    replicator = Replicator(config, lu.volume, journal, save=lambda r: record.append(r.state))
    device.remotes._replicators["x"] = replicator
    return journal, replicator


def test_a_journal_that_cannot_be_written_falls_back_and_the_lu_stays_writable(
    tmp_path: Path,
) -> None:
    """The write whose record could not be put on file fails (it was never applied);
    journaling stops, and every later write goes on, its chunks marked to copy."""
    device = Device(str(tmp_path / "data"))
    try:
        lu = device.create_lu("x", 1 << 20, pool=1)
        export = PrimaryExport(device, lu)
        saved: list[str] = []
        journal, replicator = _link(device, lu, tmp_path, saved)
        _write(export, 0)
        good_fd = journal._fd
        journal._fd = os.open(tmp_path / "journal" / "00000000.seg", os.O_RDONLY)
        try:
            with pytest.raises(StoreError):
                _write(export, 5 * BLOCK)  # the disk under the journal fails
            assert replicator.state == INCONSISTENT
            assert saved == []
            _write(export, 6 * BLOCK)
            # answered only once the catalog says so: after a crash the journal, with
            # no STOP record on file, must not be replayed as if it were complete
            assert saved == [INCONSISTENT]
            for block in (7, 8):
                _write(export, block * BLOCK)
            assert saved == [INCONSISTENT]
        finally:
            os.close(journal._fd)
            journal._fd = good_fd
        assert {5, 6, 7, 8} <= set(replicator.dirty)
        del device.remotes._replicators["x"]
        journal.close()
    finally:
        device.close()


def test_a_flush_the_journal_cannot_make_durable_fails_and_ends_journaling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A retried fsync could succeed without the data being on disk (Linux reports a
    failed write-back once): the host's FLUSH gets EIO, and the records not known
    to be durable are copied to the remote device as chunks instead."""
    device = Device(str(tmp_path / "data"))
    try:
        lu = device.create_lu("x", 1 << 20, pool=1)
        export = PrimaryExport(device, lu)
        journal, replicator = _link(device, lu, tmp_path)
        _write(export, 3 * BLOCK)

        def failing_sync() -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(journal, "sync", failing_sync)
        with pytest.raises(StoreError):
            export.flush()
        assert replicator.state == INCONSISTENT
        _write(export, 4 * BLOCK)
        export.flush()  # nothing journalled since: the journal's disk is not asked again
        assert 4 in replicator.dirty
        del device.remotes._replicators["x"]
        journal.close()
    finally:
        device.close()


def test_a_restore_whose_journal_record_cannot_be_written_leaves_nothing_waiting(
    tmp_path: Path,
) -> None:
    """The restore fails with a clear error; the LU's sequence is not held up (a later
    trigger completes), and the range is copied to the remote device instead."""
    device = Device(str(tmp_path / "data"))
    try:
        lu = device.create_lu("x", 1 << 20, pool=2)
        export = PrimaryExport(device, lu)
        _write(export, 2 * BLOCK)
        (made,) = device.triggers.trigger(["x"], "before")
        payload = memoryview(b"\x07" * BLOCK)  # the primary moves on
        ticket = export.admit(Command(0, Cmd.WRITE, 1, 2 * BLOCK, BLOCK, BLOCK), payload)
        export.write(ticket, payload, 2 * BLOCK, False)
        journal, replicator = _link(device, lu, tmp_path)
        good_fd = journal._fd
        journal._fd = os.open(tmp_path / "journal" / "00000000.seg", os.O_RDONLY)
        try:
            with pytest.raises(StoreError, match="replication journal"):
                device.backups.restore("x", made["gen"], force=True)
        finally:
            os.close(journal._fd)
            journal._fd = good_fd
        assert replicator.state == INCONSISTENT
        assert 2 in replicator.dirty
        done = threading.Thread(target=device.triggers.trigger, args=(["x"], "after"),
                                daemon=True)
        done.start()
        done.join(10)
        assert not done.is_alive(), "the trigger waits on the failed restore's operation"
        del device.remotes._replicators["x"]
        journal.close()
    finally:
        device.close()
