"""The crash journal: what recovery is told may differ or have changed."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

from mirrorpool.mirror.changes import CHUNK
from mirrorpool.mirror.journal import (
    HEADER_SIZE,
    MAX_SLOT_CHUNKS,
    REGION_CHUNKS,
    BitmapFile,
    Journal,
    SplitRecord,
    bitmap_to_bits,
    pack_slot,
    unpack_slot,
)

SIZE = 64 << 20  # 16384 chunks


def _reopen(path: Path, size: int = SIZE) -> tuple[BitMap, BitMap]:
    journal = Journal(str(path), size)
    try:
        return journal.recover()
    finally:
        journal.close()


def test_writes_in_flight_are_divergent_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = Journal(str(path), SIZE)
    journal.begin(10, 12)
    journal.begin(300, 556)  # a 1 MiB write
    divergent, changed = _reopen(path)  # the process dies here: the mapping is on file
    assert BitMap([10, 11]) | BitMap(range(300, 556)) <= divergent
    assert divergent <= changed
    assert BitMap(range(0, REGION_CHUNKS)) <= changed  # whole regions: over-reported
    journal.close()


def test_idle_ranges_leave_once_over_the_budget_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = Journal(str(path), SIZE, budget_chunks=512)
    for i in range(8):  # eight 1 MiB writes, each finished
        journal.begin(i * 256, (i + 1) * 256)
        journal.end(i * 256, (i + 1) * 256)
    journal.begin(5000, 5001)  # in flight at the crash
    divergent, _ = _reopen(path)
    journal.close()
    # what is in flight, and the newest idle ranges within the budget: freed
    # slots are used again first, so older ranges do not linger on file
    assert 5000 in divergent
    assert BitMap(range(7 * 256, 8 * 256)) <= divergent
    assert len(divergent) <= 512 + 1


def test_a_range_in_flight_is_never_evicted(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = Journal(str(path), SIZE, slots=4, budget_chunks=1)
    journal.begin(0, 256)  # stays in flight
    for i in range(1, 50):
        journal.begin(i * 256, i * 256 + 1)
        journal.end(i * 256, i * 256 + 1)
    divergent, _ = _reopen(path)
    journal.close()
    assert BitMap(range(0, 256)) <= divergent


def test_more_ranges_in_flight_than_slots_grow_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = Journal(str(path), SIZE, slots=4)
    journal.record_split(SplitRecord(7, 99, 0, 1, 1.0, "tid", "api", "label", [3]))
    for i in range(10):
        journal.begin(i * 3, i * 3 + 2)  # none ends
    divergent, _ = _reopen(path)
    assert journal.slots == 10
    for i in range(10):
        assert BitMap([i * 3, i * 3 + 1]) <= divergent
    assert [r.gen for r in journal.pending_splits()] == [7]  # moved with the slots
    journal.close()


def test_a_huge_range_takes_several_slots(tmp_path: Path) -> None:
    size = (3 * MAX_SLOT_CHUNKS + 5) * CHUNK
    path = tmp_path / "j"
    journal = Journal(str(path), size)
    journal.begin(2, 3 * MAX_SLOT_CHUNKS + 5)  # e.g. a WRITE_ZEROES of the whole LU
    divergent, _ = _reopen(path, size)
    journal.close()
    assert divergent == BitMap(range(2, 3 * MAX_SLOT_CHUNKS + 5))


def test_slots_of_the_one_chunk_format_read_the_same(tmp_path: Path) -> None:
    assert unpack_slot(struct.unpack(">Q", struct.pack(">Q", 12345))[0]) == (12345, 1)
    assert unpack_slot(struct.unpack(">Q", pack_slot(1 << 39, MAX_SLOT_CHUNKS))[0]) == (
        1 << 39, MAX_SLOT_CHUNKS)
    path = tmp_path / "j"
    Journal(str(path), SIZE).close()
    with open(path, "r+b") as f:  # a slot as the one-chunk format wrote it
        f.seek(HEADER_SIZE)
        f.write(struct.pack(">Q", 4321))
    divergent, _ = _reopen(path)
    assert divergent == BitMap([4321])


def test_restart_forgets_slots_and_keeps_the_open_change_set(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = Journal(str(path), SIZE)
    journal.begin(0, 10)
    journal.restart(BitMap([REGION_CHUNKS * 3 + 1]))
    divergent, changed = _reopen(path)
    journal.close()
    assert divergent == BitMap()
    assert changed == BitMap(range(REGION_CHUNKS * 3, REGION_CHUNKS * 4))


def test_a_split_record_is_pending_until_saved_and_says_if_applied(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = Journal(str(path), SIZE)
    journal.record_split(SplitRecord(4, 50, 1, 2, 3.5, "t-4", "inband", "nightly", [1, 2]))
    record = journal.pending_splits()[0]
    assert (record.gen, record.seq, record.label, record.recycled, record.applied) == (
        4, 50, "nightly", [1, 2], False)
    journal.split_applied(4)
    assert journal.pending_splits()[0].applied
    journal.split_saved(4)
    assert journal.pending_splits() == []
    journal.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 16000), st.integers(1, 300), st.booleans()),
                max_size=60))
def test_every_unfinished_write_is_divergent(tmp_path_factory, writes) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("j") / "j"
    journal = Journal(str(path), SIZE, slots=16, budget_chunks=64)
    unfinished = BitMap()
    for first, count, finishes in writes:
        stop = min(first + count, SIZE // CHUNK)
        journal.begin(first, stop)
        if finishes:
            journal.end(first, stop)
        else:
            unfinished.add_range(first, stop)
    divergent, changed = _reopen(path)
    journal.close()
    assert unfinished <= divergent
    assert divergent <= changed


@pytest.mark.parametrize("nchunks", [5 * 32768 + 123, 80 * 32768 + 5])  # the last page short
def test_bitmap_file_rewrites_the_pages_it_touches(tmp_path: Path, nchunks: int) -> None:
    """After saves and clears the file always says exactly what is still pending."""
    path = str(tmp_path / "m.pending")
    rng = random.Random(3)
    pending = BitMap(rng.sample(range(nchunks), 20000))
    bf = BitmapFile(path, nchunks)
    bf.save(pending)
    for step in range(30):
        if step % 3 == 2:  # a split adds chunks written since; once, most of the LU
            added = BitMap(rng.sample(range(nchunks), nchunks // 2 if step == 5 else 500))
            pending |= added
            bf.mark(added)
        else:
            cleared = BitMap(rng.sample(sorted(pending), min(300, len(pending))))
            pending -= cleared
            bf.clear(cleared)
        with open(path, "rb") as f:
            assert f.read() == bitmap_to_bits(pending, bf.nbytes)
    bf.close()
    again = BitmapFile(path, nchunks)  # clears before any load read the file first
    gone = BitMap(sorted(pending)[:50])
    again.clear(gone)
    assert again.load() == pending - gone
    again.close()
