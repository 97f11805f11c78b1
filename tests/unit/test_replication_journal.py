"""The replication journal: ordered, bounded, trimmed, and safe against a torn tail."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from mirrorpool.nbd.codec import REQUEST_HEADER
from mirrorpool.nbd.constants import REQUEST_MAGIC, Cmd, CmdFlag
from mirrorpool.replication import journal as rj
from mirrorpool.replication.journal import JournalFull, Kind, Record, ReplicationJournal
from mirrorpool.replication.link import forwarded_payload, parse_forwarded


def _records_on_file(directory: Path) -> int:
    """Records of the default test size at the start of segment 0 (the rest reads as zeros)."""
    data = (directory / "00000000.seg").read_bytes()
    size = _write(1).size
    n = 0
    while data[n * size : n * size + 4] == rj.MAGIC:
        n += 1
    return n


def _write(seq: int, size: int = 100) -> Record:
    return Record(Kind.WRITE, seq, seq * 4096, size, bytes([seq % 256]) * size)


def test_records_come_back_in_order_and_survive_a_reopen(tmp_path: Path) -> None:
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in range(1, 6):
        j.append(_write(seq))
    j.append(Record(Kind.TRIGGER, 6, 0, 0, forwarded_payload("t1", "x", 6, 2)))
    j.close()
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    records = [r for r, _ in j.records_after(2)]
    assert [r.seq for r in records] == [3, 4, 5, 6]
    assert records[0] == _write(3)
    assert parse_forwarded(records[-1].payload) == {
        "trigger_id": "t1", "label": "x", "origin_seq": 6, "origin_gen": 2}
    assert j.last_seq == 6
    j.close()


def test_a_cursor_resumes_where_the_last_read_stopped(tmp_path: Path) -> None:
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in range(1, 4):
        j.append(_write(seq))
    cursor = list(j.records_after(0))[-1][1]
    j.append(_write(4))
    assert [r.seq for r, _ in j.records_after(3, cursor)] == [4]
    j.close()


def test_a_torn_record_ends_the_journal(tmp_path: Path) -> None:
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in range(1, 4):
        j.append(_write(seq))
    j.close()
    (segment,) = [p for p in tmp_path.iterdir() if p.suffix == ".seg"]
    with open(segment, "r+b") as f:
        f.truncate(3 * _write(1).size - 7)  # the crash cut the last record short
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    assert [r.seq for r, _ in j.records_after(0)] == [1, 2]
    j.append(_write(3))  # appends after the good records, not after the torn bytes
    assert [r.seq for r, _ in j.records_after(0)] == [1, 2, 3]
    j.close()


def _overwrite_record_2(tmp_path: Path, where: int, data: bytes) -> None:
    """Records 1 to 3 on file, then ``data`` over record 2 from byte ``where`` of it."""
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in range(1, 4):
        j.append(_write(seq))
    j.close()
    (segment,) = [p for p in tmp_path.iterdir() if p.suffix == ".seg"]
    with open(segment, "r+b") as f:
        f.seek(_write(1).size + where)
        f.write(data)


def test_a_corrupt_record_is_never_sent(tmp_path: Path) -> None:
    _overwrite_record_2(tmp_path, 60, b"\xff")  # inside its payload
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    assert [r.seq for r, _ in j.records_after(0)] == [1]
    j.close()


def test_the_limit_is_kept_and_trim_frees_space(tmp_path: Path) -> None:
    size = _write(1, 1000).size
    j = ReplicationJournal(str(tmp_path), 3 * size)
    for seq in range(1, 4):
        j.append(_write(seq, 1000))
    with pytest.raises(JournalFull):
        j.append(_write(4, 1000))
    j.persist()  # as before any host is answered
    assert j.trim(3) is True  # everything sent: the journal is empty again
    assert j.used == 0
    j.append(_write(4, 1000))
    assert [r.seq for r, _ in j.records_after(0)] == [4]
    j.close()


def test_segments_roll_over_and_go_once_sent(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(rj, "SEGMENT_BYTES", 3 * _write(1).size)
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in range(1, 10):
        j.append(_write(seq))
    j.persist()  # what a host's acknowledgement waits for
    assert len([p for p in os.listdir(tmp_path) if p.endswith(".seg")]) == 3
    assert j.trim(4) is False  # the first segment (1-3) goes; 4 shares the second
    assert [r.seq for r, _ in j.records_after(4)] == [5, 6, 7, 8, 9]
    assert len([p for p in os.listdir(tmp_path) if p.endswith(".seg")]) == 2
    j.close()
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    assert [r.seq for r, _ in j.records_after(0)] == [4, 5, 6, 7, 8, 9]
    j.append(_write(10))
    assert j.last_seq == 10
    j.close()


def test_labels_never_pass_for_forwarded_triggers() -> None:
    assert parse_forwarded(b"nightly") is None
    assert parse_forwarded(b"\0not json") is None
    assert parse_forwarded(b'\0{"label": "x"}') is None  # no trigger id


def test_records_in_memory_and_on_disk_read_the_same(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(rj, "MEMORY_BYTES", 3 * _write(1).size)
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in range(1, 8):
        j.append(_write(seq))
    # 5-7 are still in memory, 1-4 only on disk
    assert [r.seq for r, c in j.records_after(4)] == [5, 6, 7]
    assert all(c is None for _, c in j.records_after(4))
    assert [r.seq for r, _ in j.records_after(1)] == [2, 3, 4, 5, 6, 7]
    assert [r for r, _ in j.records_after(4)] == [_write(5), _write(6), _write(7)]
    j.trim(6)
    assert [r.seq for r, _ in j.records_after(6)] == [7]
    j.close()


def test_a_stop_is_taken_over_the_limit_and_seen_after_a_reopen(tmp_path: Path) -> None:
    size = _write(1, 1000).size
    j = ReplicationJournal(str(tmp_path), size)
    j.append(_write(1, 1000))
    with pytest.raises(JournalFull):
        j.append(_write(2, 1000))
    j.append(Record(Kind.STOP, 2, 0, 0))  # what followed was not journalled
    j.close()
    j = ReplicationJournal(str(tmp_path), size)
    assert j.stopped
    j.reset()
    assert not j.stopped
    j.close()


@pytest.mark.parametrize("reopen", [False, True])
def test_every_record_after_reads_past_the_first_batch(tmp_path: Path, reopen: bool) -> None:
    """A fallback to refreshing turns every unsent record into chunks, not one batch."""
    j = ReplicationJournal(str(tmp_path), 64 << 20)
    count = rj.MEMORY_BATCH * 3 + 7
    for seq in range(1, count + 1):
        j.append(_write(seq, 16))
    if reopen:  # read from the files instead of memory
        j.close()
        j = ReplicationJournal(str(tmp_path), 64 << 20)
    assert [r.seq for r in j.every_record_after(5)] == list(range(6, count + 1))
    j.close()


def test_records_reach_the_file_on_persist_in_sequence_order(tmp_path: Path) -> None:
    """Appends only queue (no system call under the sequencer lock); persist writes."""
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in range(1, 6):
        j.append(_write(seq))
    assert _records_on_file(tmp_path) == 0
    j.persist(upto_seq=2)  # writes everything queued, in one go
    assert _records_on_file(tmp_path) == 5
    j.persist(upto_seq=4)  # already written: nothing to do
    j.append(_write(6))
    j.sync()
    j.close()
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    assert [r.seq for r, _ in j.records_after(0)] == [1, 2, 3, 4, 5, 6]
    j.close()


def test_a_trim_before_a_record_is_written_leaves_no_gap_on_file(tmp_path: Path) -> None:
    """The sender may have a record answered before its host thread wrote it to file.

    Trimming must not drop it from the queue: a later record would reach the file
    without it, and a replay after a crash from an older saved position would skip it.
    """
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in range(1, 4):
        j.append(_write(seq))
    j.persist()  # hosts of 1 to 3 answered
    j.append(_write(4))  # queued; its host thread is still writing the data
    assert j.trim(4) is False  # the remote device has 4 already
    j.append(_write(5))
    j.persist()
    j.close()
    j = ReplicationJournal(str(tmp_path), 1 << 20)  # after a crash, from saved position 1
    assert [r.seq for r in j.every_record_after(1)] == [2, 3, 4, 5]
    j.close()


def test_segments_of_the_earlier_layout_are_still_read(tmp_path: Path) -> None:
    """A device upgraded with records still to send sends them, then appends after them."""

    def old_record(kind: int, seq: int, offset: int, length: int, payload: bytes) -> bytes:
        head = rj._OLD_HEAD.pack(rj._OLD_MAGIC, kind, seq, offset, length, len(payload))
        return head + payload + rj._CRC.pack(zlib.crc32(payload, zlib.crc32(head)))

    old = [old_record(Kind.WRITE, 1, 4096, 5, b"hello"),
           old_record(Kind.ZERO, 2, 8192, 4096, b""),
           old_record(Kind.TRIGGER, 3, 0, 0, forwarded_payload("t", "x", 3, 1))]
    (tmp_path / "00000000.seg").write_bytes(b"".join(old) + b"\0" * 100)
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    j.append(_write(4))
    records = [r for r, _ in j.records_after(0)]
    assert records == [Record(Kind.WRITE, 1, 4096, 5, b"hello"),
                       Record(Kind.ZERO, 2, 8192, 4096, b""),
                       Record(Kind.TRIGGER, 3, 0, 0, forwarded_payload("t", "x", 3, 1)),
                       _write(4)]
    wire = [entry.wire.tobytes() for entry, _ in j.entries_after(0)]
    assert wire[1] == REQUEST_HEADER.pack(REQUEST_MAGIC, CmdFlag.NO_HOLE, Cmd.WRITE_ZEROES, 2,
                                          8192, 4096)
    j.close()


def test_records_are_journalled_as_the_requests_the_link_sends(tmp_path: Path) -> None:
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    j.append(_write(1, 8))
    j.append(Record(Kind.ZERO, 2, 0, 65536, b"\x01"))  # may be trimmed
    j.append(Record(Kind.TRIM, 3, 4096, 4096))
    j.close()
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    assert [e.wire.tobytes() for e, _ in j.entries_after(0)] == [
        REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 1, 4096, 8) + bytes([1]) * 8,
        REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Cmd.WRITE_ZEROES, 2, 0, 65536),
        REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Cmd.TRIM, 3, 4096, 4096),
    ]
    j.close()


@pytest.mark.parametrize("where", [4, 11], ids=["kind", "length"])
def test_a_corrupt_prefix_ends_the_journal(tmp_path: Path, where: int) -> None:
    """The CRC covers the record's kind and length too: a STOP cannot appear from a WRITE."""
    _overwrite_record_2(tmp_path, where, bytes([Kind.STOP]) if where == 4 else b"\x50")
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    assert [r.seq for r, _ in j.records_after(0)] == [1]
    assert not j.stopped
    j.close()


def test_records_whose_crc_left_out_the_prefix_are_still_read(tmp_path: Path) -> None:
    """Segments of the layout's first version (magic MPRW) are sent, not cut off."""
    first = rj.encode(Kind.WRITE, 1, 4096, 8, b"\x07" * 8)[rj._PREFIX.size :]
    prefix = rj._PREFIX.pack(b"MPRW", Kind.WRITE, len(first), zlib.crc32(first))
    (tmp_path / "00000000.seg").write_bytes(prefix + first + b"\0" * 64)
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    j.append(_write(2))
    assert [r for r, _ in j.records_after(0)] == [Record(Kind.WRITE, 1, 4096, 8, b"\x07" * 8),
                                                  _write(2)]
    j.close()


@pytest.mark.parametrize("size", [0, 8, 4096, 65536 + 3])
def test_a_record_carries_zlibs_crc_32_of_its_prefix_and_request(size: int) -> None:
    """The CRC may be computed by a faster library, never differently: files stay readable
    by every version, whichever library wrote them."""
    payload = os.urandom(size)
    data = rj.encode(Kind.WRITE, 7, 8192, size, payload)
    lead, crc = data[: rj._LEAD.size], rj._CRC.unpack_from(data, rj._LEAD.size)[0]
    assert crc == zlib.crc32(data[rj._PREFIX.size :], zlib.crc32(lead))


def test_a_record_already_on_file_is_not_written_again(tmp_path: Path) -> None:
    """persist(seq) of a record an earlier call wrote returns at once; later ones still go."""
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in range(1, 4):
        j.append(_write(seq))
    j.persist(upto_seq=1)
    writes = j.writes
    j.persist(upto_seq=3)  # written with 1
    assert j.writes == writes
    j.append(_write(4))
    j.persist(upto_seq=4)
    assert j.writes == writes + 1
    assert _records_on_file(tmp_path) == 4
    j.close()


def test_sync_makes_segments_left_behind_durable_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A FLUSH after a roll-over covers the records in the segment before it."""
    monkeypatch.setattr(rj, "SEGMENT_BYTES", 3 * _write(1).size)
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in range(1, 8):  # segments 0 (1-3), 1 (4-6), 2 (7)
        j.append(_write(seq))
    j.persist()
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(rj.os, "fdatasync", lambda fd: (synced.append(os.fstat(fd).st_ino),
                                                        real(fd)))
    j.sync()
    inodes = {os.stat(tmp_path / rj._segment_name(i)).st_ino for i in range(3)}
    assert set(synced) == inodes
    synced.clear()
    j.sync()  # nothing left behind since: the current segment only
    assert synced == [os.stat(tmp_path / rj._segment_name(2)).st_ino]
    j.close()


def test_the_first_sync_after_a_restart_covers_what_the_last_run_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Segments written before a crash may never have been made durable: a FLUSH
    after the restart makes them so, and a clean close leaves every one durable."""
    monkeypatch.setattr(rj, "SEGMENT_BYTES", 3 * _write(1).size)
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in range(1, 8):  # segments 0, 1 and 2
        j.append(_write(seq))
    j.persist()
    os.close(j._fd)  # the crash
    inodes = {os.stat(tmp_path / rj._segment_name(i)).st_ino for i in range(3)}
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(rj.os, "fdatasync", lambda fd: (synced.append(os.fstat(fd).st_ino),
                                                        real(fd)))
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    j.sync()
    assert set(synced) == inodes
    j.append(_write(8))  # beside 7, in segment 2
    synced.clear()
    j.close()
    assert set(synced) == {os.stat(tmp_path / rj._segment_name(2)).st_ino}


def test_a_sync_after_a_new_segment_makes_its_name_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rj, "SEGMENT_BYTES", 3 * _write(1).size)
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(rj.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino),
                                                    real(fd)))
    directory = os.stat(tmp_path).st_ino
    j.sync()  # segment 0 was made by the journal's start
    assert synced == [directory]
    synced.clear()
    j.append(_write(1))
    j.sync()  # no new file since
    assert synced == []
    for seq in range(2, 5):  # 4 goes to a new segment
        j.append(_write(seq))
    j.sync()
    assert synced == [directory]
    j.close()


def test_a_torn_record_before_the_last_segment_is_reported_as_a_hole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a power loss that kept a later segment's pages and lost some of an earlier
    one's, the later records do not follow on: the link must compare, not replay."""
    monkeypatch.setattr(rj, "SEGMENT_BYTES", 3 * _write(1).size)
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in range(1, 8):  # segments 0 (1-3), 1 (4-6), 2 (7)
        j.append(_write(seq))
    j.close()
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    assert not j.hole
    j.close()
    last = tmp_path / rj._segment_name(2)
    last.write_bytes(last.read_bytes()[:-10])  # a torn tail in the last: the usual crash
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    assert not j.hole
    j.close()
    first = tmp_path / rj._segment_name(0)
    data = bytearray(first.read_bytes())
    data[2 * _write(1).size + 40] ^= 0xFF  # record 3's payload
    first.write_bytes(bytes(data))
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    assert j.hole
    j.reset()
    assert not j.hole
    j.close()


def test_after_a_failed_sync_no_sync_succeeds_until_the_journal_starts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Linux reports a lost write-back to one fsync: a second one would succeed though
    the records are not on disk."""
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    j.append(_write(1))
    real = os.fdatasync
    calls: list[int] = []

    def fails_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(rj.os, "fdatasync", fails_once)
    with pytest.raises(OSError):
        j.sync()
    with pytest.raises(OSError, match="an earlier sync failed"):
        j.sync()
    j.reset()  # the remote copy is refreshed from changed-block tracking
    j.append(_write(2))
    j.sync()
    j.close()


def test_a_lost_page_between_whole_records_is_a_hole_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record lost whole reads as zeros, like a segment's normal end: what lies past
    it tells the difference."""
    size = _write(1).size
    monkeypatch.setattr(rj, "SEGMENT_BYTES", 3 * size)
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in range(1, 5):  # segments 0 (1-3) and 1 (4)
        j.append(_write(seq))
    j.close()
    first = tmp_path / rj._segment_name(0)
    data = bytearray(first.read_bytes())
    data[size : 2 * size] = bytes(size)  # record 2, gone
    first.write_bytes(bytes(data))
    j = ReplicationJournal(str(tmp_path), 1 << 20)
    assert j.hole
    j.close()
