"""Crash journal of a primary: what recovery must treat as changed or divergent.

Two records live in one small file per primary, both stored (through a shared
memory mapping of the file) before the data they describe is written, so they
survive a crash of the process; with ``sync=True`` each new entry is also made
durable first, which covers a power loss at the price of one device flush per
entry:

* **write-intent slots**: the chunk ranges that may have writes in flight, as
  a bounded set (an activity log, as in DRBD).  A range enters before its
  first write and leaves, least recently used first, once no write to it is
  in flight and the ranges kept cover more than a budget of chunks.  After a
  crash, exactly these chunks may differ between the primary and its active
  backup, so recovery resyncs them and nothing else.  One slot per range, not
  per chunk, keeps a 1 MiB write as cheap to note as a 4 KiB one.
* **changed regions**: coarse regions (1 MiB) written since the last split,
  in two alternating bitmaps so the previous split's set stays until that
  split is in the catalog.  After a crash they are added to the open change
  set: changed-block tracking may over-report, never under-report.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from pyroaring import BitMap

from mirrorpool.mirror.changes import CHUNK, chunk_array

MAGIC = b"MPJRNL02"
HEADER = struct.Struct(">8sIIIIQ")  # magic, slots, region chunks, nregions, current, reserved
HEADER_SIZE = 4096
EMPTY = 0xFFFFFFFFFFFFFFFF
REGION_CHUNKS = 256  # 1 MiB regions
DEFAULT_SLOTS = 4096
BUDGET_CHUNKS = 4096  # idle ranges are kept up to 16 MiB: what recovery may resync
# a slot: first chunk in the low 40 bits, chunk count - 1 in the high 24
_FIRST_BITS = 40
_FIRST_MASK = (1 << _FIRST_BITS) - 1
MAX_SLOT_CHUNKS = 1 << 24


def pack_slot(first: int, count: int) -> bytes:
    return struct.pack(">Q", ((count - 1) << _FIRST_BITS) | first)


def unpack_slot(value: int) -> tuple[int, int]:
    """(first chunk, count); a slot of the older one-chunk format reads the same."""
    return value & _FIRST_MASK, (value >> _FIRST_BITS) + 1
SPLIT_SLOTS = 16  # splits taken and not yet committed to the catalog
SPLIT_RECORD = 1024
_SPLIT = struct.Struct(">4sB3xIQiid16s16sHB")  # + label, + recycled gens (u32 each)
MAX_RECYCLED = 8


@dataclass
class SplitRecord:
    """A split as taken under the sequencer lock, before the catalog holds it."""

    gen: int
    seq: int
    gen_member: int
    next_active: int  # -1: none
    created: float
    trigger_id: str
    source: str
    label: str
    recycled: list[int]
    # the members' pending files were rewritten for this split; until then,
    # start-up works out what they must hold from the change log
    applied: bool = False

    def pack(self) -> bytes:
        label = self.label.encode()[:512]
        recycled = self.recycled[:MAX_RECYCLED]
        state = 2 if self.applied else 1
        head = _SPLIT.pack(b"SPLT", state, self.gen, self.seq, self.gen_member, self.next_active,
                           self.created, self.trigger_id.encode()[:16],
                           self.source.encode()[:16], len(label), len(recycled))
        return head + label + b"".join(struct.pack(">I", g) for g in recycled)

    @classmethod
    def unpack(cls, raw: bytes) -> SplitRecord | None:
        (magic, state, gen, seq, gen_member, next_active, created, trigger_id, source,
         label_len, nrecycled) = _SPLIT.unpack(raw[: _SPLIT.size])
        if magic != b"SPLT" or state not in (1, 2):
            return None
        pos = _SPLIT.size
        label = raw[pos : pos + label_len].decode(errors="replace")
        pos += label_len
        recycled = [struct.unpack(">I", raw[pos + 4 * i : pos + 4 * i + 4])[0]
                    for i in range(nrecycled)]
        return cls(gen, seq, gen_member, next_active, created,
                   trigger_id.rstrip(b"\0").decode(), source.rstrip(b"\0").decode(), label,
                   recycled, applied=state == 2)


class Journal:
    def __init__(self, path: str, size: int, slots: int = DEFAULT_SLOTS, sync: bool = False,
                 budget_chunks: int = BUDGET_CHUNKS):
        self.path = path
        self.slots = slots
        self.budget_chunks = budget_chunks
        self.sync = sync
        nchunks = (size + CHUNK - 1) // CHUNK
        self.nregions = (nchunks + REGION_CHUNKS - 1) // REGION_CHUNKS
        self._bitmap_bytes = (self.nregions + 7) // 8
        exists = os.path.exists(path)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._current = 0
        self._unsaved = 0
        self._split_gens: list[int | None] = [None] * SPLIT_SLOTS
        # (first, stop) chunk range -> writes in flight; ordered by last use for eviction
        self._hot: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._slot_of: dict[tuple[int, int], list[int]] = {}
        self._kept_chunks = 0  # chunks covered by the ranges in _hot (overlaps counted twice)
        self._free_slots = list(range(slots - 1, -1, -1))
        self._regions = bytearray(self._bitmap_bytes)
        self._map: mmap.mmap | None = None
        if not exists or os.fstat(self._fd).st_size < HEADER_SIZE:
            self._format()
        self._remap()

    def _remap(self) -> None:
        """Entries are stored through a shared mapping: no system call on the data path."""
        if self._map is not None:
            self._map.close()
        self._map = mmap.mmap(self._fd, os.fstat(self._fd).st_size)

    # ------------------------------------------------------------ layout

    def _slots_offset(self) -> int:
        return HEADER_SIZE

    def _bitmap_offset(self, which: int) -> int:
        return HEADER_SIZE + self.slots * 8 + which * self._bitmap_bytes

    def _split_offset(self, index: int) -> int:
        return self._bitmap_offset(2) + index * SPLIT_RECORD

    def _file_size(self) -> int:
        return self._split_offset(SPLIT_SLOTS)

    def _format(self) -> None:
        if getattr(self, "_map", None) is not None:
            self._map.close()  # type: ignore[union-attr]
            self._map = None
        size = self._file_size()
        os.ftruncate(self._fd, 0)
        os.ftruncate(self._fd, size)
        os.pwrite(self._fd, b"\xff" * (self.slots * 8), self._slots_offset())
        self._write_header()
        os.fsync(self._fd)

    def _write_header(self) -> None:
        header = HEADER.pack(MAGIC, self.slots, REGION_CHUNKS, self.nregions, self._current, 0)
        os.pwrite(self._fd, header, 0)

    # ------------------------------------------------------------ recovery

    def recover(self) -> tuple[BitMap, BitMap]:
        """What a crash may have left: (divergent chunks, changed chunks); then start afresh."""
        raw = os.pread(self._fd, HEADER_SIZE, 0)
        magic, slots, region_chunks, nregions, current, _ = HEADER.unpack(raw[: HEADER.size])
        if magic != MAGIC:
            raise ValueError(f"{self.path}: not a mirrorpool journal")
        divergent = BitMap()
        data = os.pread(self._fd, slots * 8, HEADER_SIZE)
        for (value,) in struct.iter_unpack(">Q", data):
            if value != EMPTY:
                first, count = unpack_slot(value)
                divergent.add_range(first, first + count)
        changed = BitMap()
        bitmap_bytes = (nregions + 7) // 8
        for which in (0, 1):
            offset = HEADER_SIZE + slots * 8 + which * bitmap_bytes
            bits = os.pread(self._fd, bitmap_bytes, offset)
            for i, byte in enumerate(bits):
                if not byte:
                    continue
                for bit in range(8):
                    if byte & (1 << bit):
                        region = i * 8 + bit
                        changed.add_range(region * region_chunks, (region + 1) * region_chunks)
        return divergent, changed | divergent

    def restart(self, changed: BitMap) -> None:
        """Start afresh, still covering ``changed`` (the open change set held in memory)."""
        self._hot.clear()
        self._slot_of.clear()
        self._kept_chunks = 0
        self._free_slots = list(range(self.slots - 1, -1, -1))
        self._regions = bytearray(self._bitmap_bytes)
        self._current = 0
        self._unsaved = 0
        self._split_gens = [None] * SPLIT_SLOTS
        for chunk in changed:
            region = chunk // REGION_CHUNKS
            if region < self.nregions:
                self._regions[region >> 3] |= 1 << (region & 7)
        self._format()
        os.pwrite(self._fd, bytes(self._regions), self._bitmap_offset(0))
        os.fsync(self._fd)
        self._remap()

    # ------------------------------------------------------------ data path

    def begin(self, first: int, stop: int) -> None:
        """Chunks [first, stop) are about to be written; the caller holds the sequencer lock."""
        key = (first, stop)
        dirty = False
        count = self._hot.get(key)
        if count is None:
            self._enter(key)
            self._hot[key] = 1
            dirty = True
        else:
            self._hot[key] = count + 1
            self._hot.move_to_end(key)
        for region in range(first // REGION_CHUNKS, (stop - 1) // REGION_CHUNKS + 1):
            byte, bit = divmod(region, 8)
            if not self._regions[byte] & (1 << bit):
                self._regions[byte] |= 1 << bit
                self._map[self._bitmap_offset(self._current) + byte] = self._regions[byte]  # type: ignore[index]
                dirty = True
        if dirty and self.sync:
            self._map.flush()  # type: ignore[union-attr]

    def end(self, first: int, stop: int) -> None:
        key = (first, stop)
        count = self._hot.get(key)
        if count is not None:
            self._hot[key] = count - 1

    def _enter(self, key: tuple[int, int]) -> None:
        first, stop = key
        pieces = [(f, min(stop, f + MAX_SLOT_CHUNKS)) for f in range(first, stop, MAX_SLOT_CHUNKS)]
        self._kept_chunks += stop - first
        self._evict(len(pieces))
        taken: list[int] = []
        self._slot_of[key] = taken  # first, so that a slot stolen meanwhile keeps the others
        for f, s in pieces:
            slot = self._free_slots.pop() if self._free_slots else self._steal_slot()
            offset = self._slots_offset() + slot * 8
            self._map[offset : offset + 8] = pack_slot(f, s - f)  # type: ignore[index]
            taken.append(slot)

    def _evict(self, wanted: int) -> None:
        """Free idle ranges, oldest first, to hold the budget and find ``wanted`` free slots.

        A freed slot is not rewritten: its range stays on file, an over-report,
        until the slot is used again.
        """
        kept, free = self._kept_chunks, len(self._free_slots)
        victims = []
        for key, count in self._hot.items():
            if kept <= self.budget_chunks and free >= wanted:
                break
            if count <= 0:
                victims.append(key)
                kept -= key[1] - key[0]
                free += len(self._slot_of[key])
        for key in victims:
            del self._hot[key]
            self._free_slots.extend(self._slot_of.pop(key))
        self._kept_chunks = kept

    def _steal_slot(self) -> int:
        # Every slot has a write in flight: grow past the bound rather than lose track.
        self.slots += 1
        # the split records move with the end of the slots: keep them
        records = [os.pread(self._fd, SPLIT_RECORD, self._split_offset(i) - 8)
                   for i in range(SPLIT_SLOTS)]
        os.ftruncate(self._fd, self._file_size())
        for i, raw in enumerate(records):
            os.pwrite(self._fd, raw, self._split_offset(i))
        self._rewrite_all()
        self._remap()
        return self.slots - 1

    def _rewrite_all(self) -> None:
        slots = bytearray(b"\xff" * (self.slots * 8))
        for (first, stop), taken in self._slot_of.items():
            pieces = range(first, stop, MAX_SLOT_CHUNKS)
            for slot, f in zip(taken, pieces, strict=False):  # pieces not yet given a slot
                slots[slot * 8 : slot * 8 + 8] = pack_slot(f, min(stop, f + MAX_SLOT_CHUNKS) - f)
        os.pwrite(self._fd, bytes(slots), self._slots_offset())
        self._write_header()
        for which in (0, 1):
            data = self._regions if which == self._current else bytes(self._bitmap_bytes)
            os.pwrite(self._fd, bytes(data), self._bitmap_offset(which))

    # ------------------------------------------------------------ splits

    def rotate(self) -> None:
        """At a split (sequencer lock held): later writes go to the other region bitmap.

        The other bitmap is only cleared once every split taken so far is in the
        catalog (``split_saved``); until then its bits stay, which over-reports.
        """
        self._current ^= 1
        self._unsaved += 1
        offset = self._bitmap_offset(self._current)
        self._regions = bytearray(os.pread(self._fd, self._bitmap_bytes, offset))
        self._write_header()
        if self.sync:
            os.fdatasync(self._fd)

    def record_split(self, record: SplitRecord) -> None:
        """Note a split before any write reaches its new active backup (lock held)."""
        free = next((i for i, gen in enumerate(self._split_gens) if gen is None), None)
        if free is None:  # more splits in flight than slots: overwrite the oldest
            free = min(range(SPLIT_SLOTS), key=lambda i: self._split_gens[i] or 0)
        raw = record.pack()
        offset = self._split_offset(free)
        self._map[offset : offset + len(raw)] = raw  # type: ignore[index]
        self._split_gens[free] = record.gen
        if self.sync:
            self._map.flush()  # type: ignore[union-attr]

    def split_applied(self, gen: int) -> None:
        """The pending files of a noted split's members are written (lock held)."""
        for i, recorded in enumerate(self._split_gens):
            if recorded == gen:
                self._map[self._split_offset(i) + 4] = 2  # type: ignore[index]
        if self.sync:
            self._map.flush()  # type: ignore[union-attr]

    def pending_splits(self) -> list[SplitRecord]:
        """Splits noted and never confirmed as committed, oldest first."""
        header = os.pread(self._fd, HEADER.size, 0)
        slots = HEADER.unpack(header)[1] if header[:8] == MAGIC else self.slots
        base = HEADER_SIZE + slots * 8 + 2 * self._bitmap_bytes
        records = []
        for i in range(SPLIT_SLOTS):
            raw = os.pread(self._fd, SPLIT_RECORD, base + i * SPLIT_RECORD)
            if len(raw) == SPLIT_RECORD:
                record = SplitRecord.unpack(raw)
                if record is not None:
                    records.append(record)
        return sorted(records, key=lambda r: r.gen)

    def split_saved(self, gen: int | None = None) -> None:
        """The catalog now holds a split's change set (sequencer lock held)."""
        for i, recorded in enumerate(self._split_gens):
            if recorded is not None and recorded == gen:
                self._map[self._split_offset(i) + 4] = 0  # type: ignore[index]
                self._split_gens[i] = None
        self._unsaved = max(0, self._unsaved - 1)
        if self._unsaved == 0:
            os.pwrite(self._fd, bytes(self._bitmap_bytes), self._bitmap_offset(self._current ^ 1))

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def bitmap_to_bits(chunks: BitMap, nbytes: int) -> bytes:
    """Chunk c as bit (c & 7) of byte c >> 3; vectorised, as splits do this under a lock."""
    bits = np.zeros(nbytes * 8, dtype=np.bool_)
    if chunks:
        idx = chunk_array(chunks)
        bits[idx[idx < nbytes * 8]] = True
    return np.packbits(bits, bitorder="little").tobytes()


def bits_to_bitmap(data: bytes) -> BitMap:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    return BitMap(np.flatnonzero(bits).astype(np.uint32))


class BitmapFile:
    """A chunk bitmap kept in a file of its own, one bit per chunk, updated in place.

    A pool member's pending set lives here, so the copy-before-write state of
    a generation is exact after a crash: a chunk's bit is cleared only after
    its data was copied, and before the primary is overwritten.  An image of
    the file is kept in memory, so clearing bits rewrites only the 4 KiB
    pages of the file that hold them.
    """

    PAGE = 4096

    def __init__(self, path: str, nchunks: int) -> None:
        self.path = path
        self.nbytes = (nchunks + 7) // 8
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size < self.nbytes:
            os.ftruncate(self._fd, self.nbytes)
        self._image: np.ndarray | None = None  # the file's bytes, once read or written

    def _read_image(self) -> np.ndarray:
        raw = os.pread(self._fd, self.nbytes, 0)
        image = np.zeros(self.nbytes, dtype=np.uint8)
        image[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self._image = image
        return image

    def load(self) -> BitMap:
        return bits_to_bitmap(self._read_image().tobytes())

    def save(self, chunks: BitMap) -> None:
        data = bitmap_to_bits(chunks, self.nbytes)
        os.pwrite(self._fd, data, 0)
        self._image = np.frombuffer(data, dtype=np.uint8).copy()

    def clear(self, cleared: BitMap) -> None:
        """Clear the bits of ``cleared`` and write back the pages holding them."""
        self._change(cleared, False)

    def mark(self, added: BitMap) -> None:
        """Set the bits of ``added`` and write back the pages holding them.

        A split adds the chunks written since a member's own split: this costs
        what those chunks cost, where ``save`` rewrites the whole file.
        """
        self._change(added, True)

    def _change(self, chunks: BitMap, value: bool) -> None:
        if not chunks:
            return
        image = self._image if self._image is not None else self._read_image()
        idx = chunk_array(chunks)
        idx = idx[idx < self.nbytes * 8]
        if not len(idx):
            return
        if len(idx) * 4 > self.nbytes * 8:  # dense: bit by bit over the whole file costs less
            bits = np.unpackbits(image, bitorder="little")
            bits[idx] = value
            image[:] = np.packbits(bits, bitorder="little")
            os.pwrite(self._fd, image, 0)
            return
        masks = np.left_shift(np.uint8(1), (idx & 7).astype(np.uint8))
        if value:
            np.bitwise_or.at(image, idx >> 3, masks)
        else:
            np.bitwise_and.at(image, idx >> 3, np.invert(masks))
        pages = (idx >> 15).astype(np.int64)  # 32768 chunks to a page of the file; ascending
        first, last = int(pages[0]), int(pages[-1])
        if last - first < 64:  # one write of up to 256 KiB costs less than many of 4 KiB
            os.pwrite(self._fd, image[first * self.PAGE : (last + 1) * self.PAGE],
                      first * self.PAGE)
            return
        for page in pages[np.flatnonzero(np.diff(pages, prepend=-1))].tolist():
            lo = page * self.PAGE
            os.pwrite(self._fd, image[lo : lo + self.PAGE], lo)

    def resize(self, nchunks: int) -> None:
        self.nbytes = (nchunks + 7) // 8
        if os.fstat(self._fd).st_size < self.nbytes:
            os.ftruncate(self._fd, self.nbytes)
        self._image = None  # read again when next needed

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
