"""The replication journal of a primary: its mutations and TRIGGERs, in sequence order.

A record is appended when the sequencer numbers the mutation (under its lock),
so the file order is the sequence order the remote device must apply.  Records
leave once the remote device has them on stable storage (``trim``).  The file
is a run of segments; each record carries a CRC, so a record torn by a crash
ends the journal instead of being sent.

Layout of a record: a prefix ``>4sBxxxII`` (magic, kind, length of what follows,
CRC-32 of the prefix's first 12 bytes and of what follows), then the NBD request
exactly as the link sends it: the request header, whose cookie is the sequence
number, and the payload.  The sender passes records to the socket as they are,
with no per-record encoding.
Segments written by earlier versions (magic ``MPRJ``, and ``MPRW``, whose CRC left
out the prefix) are still read.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import logging
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import BinaryIO, NamedTuple

from mirrorpool.nbd.codec import REQUEST_HEADER
from mirrorpool.nbd.constants import REQUEST_MAGIC, Cmd, CmdFlag

try:
    # The same CRC-32 as zlib's, with SIMD: 0.12 µs for a 4 KiB record against 1.1,
    # and every host write of a replicated LU computes one.
    from isal.isal_zlib import crc32
except ImportError:  # no wheel for this platform: the same values, slower
    from zlib import crc32

log = logging.getLogger("mirrorpool.replication")

MAGIC = b"MPRX"
_LEAD = struct.Struct(">4sBxxxI")  # magic, kind, wire length
_PREFIX = struct.Struct(">4sBxxxII")  # the same, then a CRC-32 of them and of the wire bytes
_WIRE = REQUEST_HEADER  # magic, flags, type, cookie (the sequence number), offset, length
_OLD_MAGIC = b"MPRJ"  # before the wire layout: header, payload, CRC of both
_WIRE_CRC_MAGIC = b"MPRW"  # the wire layout with a CRC of the wire bytes alone
_OLD_HEAD = struct.Struct(">4sBxxxQQQI")
_CRC = struct.Struct(">I")
JOURNALLED_WRITE_OVERHEAD = _PREFIX.size + _WIRE.size  # a WRITE's bytes on file past its data
SEGMENT_BYTES = 64 << 20
MEMORY_BYTES = 64 << 20  # newest records also kept in memory, for the sender
MEMORY_BATCH = 256
WRITEV_MAX = 512  # records per writev (IOV_MAX is 1024)


class Kind(IntEnum):
    WRITE = 1
    ZERO = 2  # offset, length; payload: b"\x01" if the range may be trimmed
    TRIM = 3
    TRIGGER = 4  # payload: JSON of the trigger (id, label, generation)
    STOP = 5  # journaling stopped here (the journal filled up, or a write failed)


class JournalFull(Exception):
    """The journal limit is reached: the remote copy falls back to changed-block tracking."""


# The NBD command that carries each kind over the link (STOP is never sent).
_COMMAND = {Kind.WRITE: Cmd.WRITE, Kind.ZERO: Cmd.WRITE_ZEROES, Kind.TRIM: Cmd.TRIM,
            Kind.TRIGGER: Cmd.TRIGGER, Kind.STOP: Cmd.FLUSH}


def encode(kind: int, seq: int, offset: int, length: int,
           payload: bytes | memoryview = b"") -> bytes:
    """A record as on file; copies the payload once (its view may be reused)."""
    if kind == Kind.ZERO:
        # payload b"\x01": the range may be trimmed; else the zeros must stay allocated
        head = _WIRE.pack(REQUEST_MAGIC, 0 if payload == b"\x01" else CmdFlag.NO_HOLE,
                          Cmd.WRITE_ZEROES, seq, offset, length)
        payload = b""
    elif kind == Kind.TRIGGER:
        head = _WIRE.pack(REQUEST_MAGIC, 0, Cmd.TRIGGER, seq, 0, len(payload))
    else:
        head = _WIRE.pack(REQUEST_MAGIC, 0, _COMMAND[kind], seq, offset, length)
    lead = _LEAD.pack(MAGIC, kind, len(head) + len(payload))
    crc = crc32(payload, crc32(lead + head))
    return b"".join((lead, _CRC.pack(crc), head, payload))


class Entry(NamedTuple):
    """A journalled record as the sender needs it."""

    seq: int
    kind: int
    data: bytes | bytearray | memoryview  # the record as on file: prefix, NBD request

    @property
    def wire(self) -> memoryview:
        return memoryview(self.data)[_PREFIX.size :]


# Entry(seq, kind, data) without NamedTuple's __new__, a Python call: once per host write
_new_entry = functools.partial(tuple.__new__, Entry)


@dataclass(frozen=True)
class Record:
    kind: Kind
    seq: int
    offset: int
    length: int
    payload: bytes | memoryview = b""

    def encode(self) -> bytes:
        return encode(self.kind, self.seq, self.offset, self.length, self.payload)

    @property
    def size(self) -> int:
        return len(self.encode())

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Record:
        """The record of an encoded one (its payload a view of ``data``)."""
        view = memoryview(data)
        kind = view[4]
        _, flags, _, seq, offset, length = _WIRE.unpack_from(view, _PREFIX.size)
        payload: bytes | memoryview = view[_PREFIX.size + _WIRE.size :]
        if kind == Kind.ZERO:
            payload = b"" if flags & CmdFlag.NO_HOLE else b"\x01"
        elif kind != Kind.WRITE:
            payload = bytes(payload)
        if kind == Kind.TRIGGER:
            length = 0  # on the wire, the payload's length
        return cls(Kind(kind), seq, offset, length, payload)


def _segment_name(index: int) -> str:
    return f"{index:08d}.seg"


class ReplicationJournal:
    def __init__(self, directory: str, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        os.makedirs(directory, exist_ok=True)
        self._lock = threading.Lock()
        # Records are numbered and queued under the sequencer lock, and written to
        # the file by persist() before the host's write is acknowledged: one
        # writev for all that queued meanwhile, and no system call under the
        # sequencer lock.  _io_lock keeps the file in sequence order; taken before _lock.
        self._io_lock = threading.Lock()
        self._pending: list[tuple[int, bytes, int]] = []  # (segment, record bytes, seq)
        self._fd_index = -1
        self._fd_end = 0  # bytes of records in the file of _fd_index
        self._written: dict[int, int] = {}  # the same, for segments written before
        self._unsynced: set[int] = set()  # segments written, then left, since the last sync
        self._new_names = False  # segment files made since the last sync (the directory)
        # Linux reports a failed write-back to one fsync only: after one, no later
        # sync can vouch for the records, until the journal starts again (reset)
        self._sync_failed: OSError | None = None
        self._used = 0
        # segment index -> (bytes, last seq)
        self._segments: dict[int, tuple[int, int]] = {}
        self._fd = -1
        self._current = 0
        self.last_seq = 0
        self.stopped = False  # the newest record on file is a STOP
        # found at start-up: a segment before the last ends in a torn record, so the
        # records after it are not a continuation of those before
        self.hole = False
        self.writes = 0  # system calls that wrote records (one may write many)
        # The newest records are also kept in memory, so the sender need not read
        # them back: every record numbered above _disk_only_upto is in _mem.
        self._mem: list[Entry] = []
        self._mem_seqs: list[int] = []
        self._mem_start = 0
        self._mem_bytes = 0
        self._recover()
        self._disk_only_upto = self.last_seq
        # every record numbered up to here is in the files (or was forgotten by reset)
        self._persisted_seq = self.last_seq

    # ------------------------------------------------------------ files

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, _segment_name(index))

    def _recover(self) -> None:
        indexes = sorted(int(n[:-4]) for n in os.listdir(self.directory)
                         if n.endswith(".seg") and n[:-4].isdigit())
        for index in indexes:
            good, last = 0, 0
            for entry, end in self._scan(index):
                good, last = end, entry.seq
                self.stopped = entry.kind == Kind.STOP
            if index != indexes[-1] and self._torn_at(index, good):
                # A later segment holds records past a hole (a power loss kept some
                # pages and lost others): what follows it cannot be replayed in order.
                self.hole = True
            if os.path.getsize(self._path(index)) != good:
                os.truncate(self._path(index), good)  # a torn tail: never sent
            self._segments[index] = (good, last)
            self._written[index] = good
            self.last_seq = max(self.last_seq, last)
        self._current = indexes[-1] if indexes else 0
        # written by an earlier run, maybe never made durable (a sync covers them too)
        self._unsynced.update(i for i in indexes if i != self._current)
        self._segments.setdefault(self._current, (0, 0))
        self._used = sum(size for size, _ in self._segments.values())
        self._open(self._current)

    def _torn_at(self, index: int, end: int) -> bool:
        """Does segment ``index`` hold anything but zeros past where its records end?"""
        with open(self._path(index), "rb") as f:
            f.seek(end)
            while block := f.read(1 << 20):
                if block.count(0) != len(block):
                    return True
        return False

    def _open(self, index: int) -> None:
        path = self._path(index)
        self._new_names = self._new_names or not os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self._fd >= 0:
            os.close(self._fd)
            self._unsynced.add(self._fd_index)
        self._fd = fd
        self._fd_index = index
        # Where the next record goes: after the last whole record (start-up cut any
        # torn tail).  The segment's space is allocated once, up front: an append
        # that allocates blocks costs several times the copy itself.  Past the
        # records the file reads as zeros, which no record begins with.
        self._fd_end = self._written.get(index, 0)
        self._preallocate()

    def _preallocate(self) -> None:
        with contextlib.suppress(OSError):  # a file system without it: plain writes
            os.posix_fallocate(self._fd, 0, SEGMENT_BYTES)

    def _scan(self, index: int, start: int = 0) -> Iterator[tuple[Entry, int]]:
        """Records of one segment from byte ``start``, each with the offset after it."""
        try:
            f = open(self._path(index), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return
        with f:
            f.seek(start)
            pos = start
            while True:
                prefix = f.read(_PREFIX.size)
                if len(prefix) < _PREFIX.size:
                    return
                if prefix[:4] == _OLD_MAGIC:
                    got = self._read_old(f, prefix)
                    if got is None:
                        return
                    entry, size = got
                else:
                    magic, kind, wire_len, crc = _PREFIX.unpack(prefix)
                    if magic not in (MAGIC, _WIRE_CRC_MAGIC) or kind not in _COMMAND \
                            or not _WIRE.size <= wire_len <= SEGMENT_BYTES:
                        return
                    data = bytearray(_PREFIX.size + wire_len)
                    data[: _PREFIX.size] = prefix
                    wire = memoryview(data)[_PREFIX.size :]
                    lead = crc32(prefix[: _LEAD.size]) if magic == MAGIC else 0
                    if f.readinto(wire) < wire_len or crc != crc32(wire, lead):
                        return
                    _, _, command, seq, _, _ = _WIRE.unpack_from(wire)
                    if command != _COMMAND[kind]:
                        return
                    entry, size = Entry(seq, kind, data), _PREFIX.size + wire_len
                pos += size
                yield entry, pos

    @staticmethod
    def _read_old(f: BinaryIO, prefix: bytes) -> tuple[Entry, int] | None:
        """A record of the earlier layout, re-encoded; None if torn or corrupt."""
        head = prefix + f.read(_OLD_HEAD.size - len(prefix))
        if len(head) < _OLD_HEAD.size:
            return None
        _, kind, seq, offset, length, plen = _OLD_HEAD.unpack(head)
        if kind not in Kind._value2member_map_:
            return None
        payload = f.read(plen)
        crc = f.read(_CRC.size)
        if len(payload) < plen or len(crc) < _CRC.size \
                or _CRC.unpack(crc)[0] != crc32(payload, crc32(head)):
            return None
        data = encode(kind, seq, offset, length, payload)
        return Entry(seq, kind, data), _OLD_HEAD.size + plen + _CRC.size

    # ------------------------------------------------------------ writing

    @property
    def used(self) -> int:
        return self._used

    def append(self, record: Record) -> None:
        self.append_encoded(record.seq, record.kind, record.encode())

    def append_encoded(self, seq: int, kind: int, data: bytes) -> None:
        """Append a record made by ``encode``, in sequence order (the caller holds the
        sequencer lock).

        A STOP record is taken even over the limit: after a crash it tells that
        what followed was not journalled.
        """
        size = len(data)
        with self._lock:
            if self._used + size > self.limit and kind != Kind.STOP:
                raise JournalFull(f"replication journal full ({self._used} of {self.limit} "
                                  "bytes)")
            current = self._current
            used, _ = self._segments[current]
            if used and used + size > SEGMENT_BYTES:
                current = self._current = current + 1
                used = 0
            self._pending.append((current, data, seq))
            self._segments[current] = (used + size, seq)
            self._used += size
            self.last_seq = seq
            self.stopped = kind == Kind.STOP
            self._mem.append(_new_entry((seq, kind, data)))
            self._mem_seqs.append(seq)
            self._mem_bytes += size
            if self._mem_bytes > MEMORY_BYTES:
                self._shed_mem()
        if kind == Kind.STOP:
            self.persist()  # start-up after a crash must see it

    def _shed_mem(self) -> None:
        """Keep MEMORY_BYTES of the newest records in memory (lock held)."""
        while self._mem_bytes > MEMORY_BYTES and self._mem_start < len(self._mem):
            dropped = self._mem[self._mem_start]
            self._mem_start += 1
            self._mem_bytes -= len(dropped.data)
            self._disk_only_upto = dropped.seq
        self._compact_mem()

    def persist(self, upto_seq: int | None = None) -> None:
        """Write the queued records to the file, in order (before a host is answered)."""
        if upto_seq is not None and upto_seq <= self._persisted_seq:
            # Already written by another call (a connection that received several writes
            # persists all of their records at once): no lock to take.
            return
        with self._io_lock:
            with self._lock:
                if not self._pending or (upto_seq is not None
                                         and self._pending[0][2] > upto_seq):
                    return  # another thread wrote it meanwhile
                pending, self._pending = self._pending, []
            start = 0
            try:
                while start < len(pending):
                    index = pending[start][0]
                    stop = start
                    while stop < len(pending) and stop - start < WRITEV_MAX \
                            and pending[stop][0] == index:
                        stop += 1
                    if index != self._fd_index:
                        self._open(index)
                    self._write_all([data for _, data, _ in pending[start:stop]])
                    self._written[index] = self._fd_end
                    self._persisted_seq = pending[stop - 1][2]
                    start = stop
            except OSError:
                with self._lock:  # not written: they stay queued, and the caller fails
                    self._pending[:0] = pending[start:]
                raise

    def discard_queued(self) -> None:
        """Forget the records not yet on file (journaling stopped; their chunks are
        refreshed from the records still in memory)."""
        with self._io_lock, self._lock:
            self._pending.clear()

    def _write_all(self, datas: list[bytes]) -> None:
        """pwritev until every byte is in the file (a short write leaves no gap)."""
        total = sum(map(len, datas))
        self.writes += 1
        done = os.pwritev(self._fd, datas, self._fd_end)
        while done < total:  # rare: only then is the batch joined
            n = os.pwrite(self._fd, memoryview(b"".join(datas))[done:], self._fd_end + done)
            if n <= 0:
                raise OSError(errno.EIO, "replication journal: nothing written")
            done += n
        self._fd_end += total

    def sync(self) -> None:
        """Persist, then make the journal durable (a host's FLUSH or FUA write).

        The segments left for a new one since the last sync are made durable too.
        """
        self.persist()
        with self._io_lock:
            if self._sync_failed is not None:
                raise OSError(errno.EIO, f"an earlier sync failed: {self._sync_failed}")
            older, self._unsynced = self._unsynced, set()
            try:
                for index in sorted(older):
                    try:
                        fd = os.open(self._path(index), os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        older.discard(index)  # trimmed: the remote device has its records
                        continue
                    try:
                        os.fdatasync(fd)
                    finally:
                        os.close(fd)
                    older.discard(index)
                if self._fd >= 0:
                    os.fdatasync(self._fd)
                if self._new_names:  # a new segment's name must survive a power loss too
                    fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    self._new_names = False
            except OSError as exc:
                self._sync_failed = exc
                raise
            finally:
                self._unsynced |= older

    # ------------------------------------------------------------ reading and trimming

    def _compact_mem(self) -> None:
        if self._mem_start > 4096 and self._mem_start * 2 > len(self._mem):
            del self._mem[: self._mem_start]
            del self._mem_seqs[: self._mem_start]
            self._mem_start = 0

    def _forget_mem(self, upto_seq: int) -> None:
        """Records up to ``upto_seq`` will not be read again (lock held)."""
        i = bisect.bisect_right(self._mem_seqs, upto_seq, self._mem_start)
        for entry in self._mem[self._mem_start : i]:
            self._mem_bytes -= len(entry.data)
        self._mem_start = i
        self._disk_only_upto = max(self._disk_only_upto, upto_seq)
        self._compact_mem()

    def entries_after(
        self, seq: int, cursor: tuple[int, int] | None = None,
    ) -> Iterator[tuple[Entry, tuple[int, int] | None]]:
        """Records numbered above ``seq`` in order, each with the cursor just past it.

        A cursor from an earlier call resumes there instead of scanning from the start.
        Records still held in memory come from there (with no cursor), a batch at a time.
        """
        with self._lock:
            if seq >= self._disk_only_upto:
                i = bisect.bisect_right(self._mem_seqs, seq, self._mem_start)
                batch = self._mem[i : i + MEMORY_BATCH]
            else:
                batch = None
        if batch is not None:
            for entry in batch:
                yield entry, None
            return
        self.persist()  # the files must hold what memory no longer does
        with self._lock:
            indexes = sorted(i for i, (size, last) in self._segments.items()
                             if size and last > seq)
        for index in indexes:
            start = 0
            if cursor is not None:
                if index < cursor[0]:
                    continue
                if index == cursor[0]:
                    start = cursor[1]
            for entry, end in self._scan(index, start):
                if entry.seq > seq:
                    yield entry, (index, end)

    def records_after(
        self, seq: int, cursor: tuple[int, int] | None = None,
    ) -> Iterator[tuple[Record, tuple[int, int] | None]]:
        """As ``entries_after``, decoded."""
        for entry, after in self.entries_after(seq, cursor):
            yield Record.decode(entry.data), after

    def every_record_after(self, seq: int) -> Iterator[Record]:
        """Every record numbered above ``seq``, however many batches that takes."""
        cursor: tuple[int, int] | None = None
        while True:
            last = seq
            for record, after in self.records_after(seq, cursor):
                last = record.seq
                if after is not None:
                    cursor = after
                yield record
            if last == seq:
                return
            seq = last

    def trim(self, upto_seq: int) -> bool:
        """The remote device has every record up to ``upto_seq`` on stable storage.

        Returns True when the journal became empty (cursors into it are void).
        """
        with self._io_lock, self._lock:
            self._forget_mem(upto_seq)
            done = [i for i, (size, last) in self._segments.items()
                    if i != self._current and last <= upto_seq
                    and not any(p[0] == i for p in self._pending)]
            for index in done:
                self._used -= self._segments.pop(index)[0]
                self._written.pop(index, None)
                self._unsynced.discard(index)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(index))
            size, last = self._segments[self._current]
            if size and last <= upto_seq and len(self._segments) == 1 and not self._pending:
                # everything was sent: the current segment starts again
                self._truncate_current()
                return True
            return False

    def _truncate_current(self) -> None:
        """Empty the current segment (both locks held)."""
        if self._fd_index != self._current:
            self._open(self._current)
        os.ftruncate(self._fd, 0)
        self._fd_end = self._written[self._current] = 0
        self._preallocate()
        self._used -= self._segments[self._current][0]
        self._segments[self._current] = (0, 0)

    def reset(self) -> None:
        """Forget every record (the remote copy is resynced from changed-block tracking)."""
        with self._io_lock, self._lock:
            self._pending.clear()
            self._unsynced.clear()
            self.hole = False
            self._sync_failed = None
            for index in list(self._segments):
                if index != self._current:
                    self._used -= self._segments.pop(index)[0]
                    self._written.pop(index, None)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._path(index))
            self._truncate_current()
            self.stopped = False
            self._mem.clear()
            self._mem_seqs.clear()
            self._mem_start = self._mem_bytes = 0
            self._disk_only_upto = self.last_seq

    def close(self) -> None:
        self.persist()
        try:
            self.sync()  # a clean stop leaves the journal durable, as it leaves the data
        except OSError as exc:
            log.error("replication journal not made durable at close",
                      extra={"journal": self.directory, "error": str(exc)})
        with self._io_lock, self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
