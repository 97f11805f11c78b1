"""The replication journal of a primary: its mutations and TRIGGERs, in sequence order.

A record is appended when the sequencer numbers the mutation (under its lock),
so the file order is the sequence order the remote device must apply.  Records
leave once the remote device has them on stable storage (``trim``).  The file
is a run of segments; each record carries a CRC, so a record torn by a crash
ends the journal instead of being sent.

Layout of a record: header ``>4sBxxxQQQI`` (magic, kind, seq, offset, length,
payload length), the payload, then a CRC-32 of both.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"MPRJ"
_HEAD = struct.Struct(">4sBxxxQQQI")
_CRC = struct.Struct(">I")
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


@dataclass(frozen=True)
class Record:
    kind: Kind
    seq: int
    offset: int
    length: int
    # a WRITE's data may be a view (of the server's buffer, or of the encoded record)
    payload: bytes | memoryview = b""

    def encode(self) -> bytes:
        """The record as on file; copies the payload once (its view may be reused)."""
        head = _HEAD.pack(MAGIC, self.kind, self.seq, self.offset, self.length,
                          len(self.payload))
        crc = zlib.crc32(self.payload, zlib.crc32(head))
        return b"".join((head, self.payload, _CRC.pack(crc)))

    def kept(self, encoded: bytes) -> Record:
        """The same record with its payload a view of ``encoded`` (no second copy)."""
        if self.kind != Kind.WRITE:
            return self if isinstance(self.payload, bytes) else \
                Record(self.kind, self.seq, self.offset, self.length, bytes(self.payload))
        view = memoryview(encoded)[_HEAD.size : _HEAD.size + len(self.payload)]
        return Record(self.kind, self.seq, self.offset, self.length, view)

    @property
    def size(self) -> int:
        return _HEAD.size + len(self.payload) + _CRC.size


def _segment_name(index: int) -> str:
    return f"{index:08d}.seg"


class ReplicationJournal:
    def __init__(self, directory: str, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        os.makedirs(directory, exist_ok=True)
        self._lock = threading.Lock()
        self._appended = threading.Condition(self._lock)
        # Records are numbered and queued under the sequencer lock, and written to
        # the file by persist() before the host's write is acknowledged: one
        # writev for all that queued meanwhile, and no system call under the
        # sequencer lock.  _io_lock keeps the file in sequence order; taken before _lock.
        self._io_lock = threading.Lock()
        self._pending: list[tuple[int, bytes, int]] = []  # (segment, record bytes, seq)
        self._fd_index = -1
        self._fd_end = 0  # bytes of records in the file of _fd_index
        self._written: dict[int, int] = {}  # the same, for segments written before
        self._used = 0
        # segment index -> (bytes, last seq)
        self._segments: dict[int, tuple[int, int]] = {}
        self._fd = -1
        self._current = 0
        self.last_seq = 0
        self.stopped = False  # the newest record on file is a STOP
        # The newest records are also kept in memory, so the sender need not read
        # them back: every record numbered above _disk_only_upto is in _mem.
        self._mem: list[Record] = []
        self._mem_seqs: list[int] = []
        self._mem_start = 0
        self._mem_bytes = 0
        self._recover()
        self._disk_only_upto = self.last_seq

    # ------------------------------------------------------------ files

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, _segment_name(index))

    def _recover(self) -> None:
        indexes = sorted(int(n[:-4]) for n in os.listdir(self.directory)
                         if n.endswith(".seg") and n[:-4].isdigit())
        for index in indexes:
            good, last = 0, 0
            for record, end in self._scan(index):
                good, last = end, record.seq
                self.stopped = record.kind == Kind.STOP
            if os.path.getsize(self._path(index)) != good:
                os.truncate(self._path(index), good)  # a torn tail: never sent
            self._segments[index] = (good, last)
            self._written[index] = good
            self.last_seq = max(self.last_seq, last)
        self._current = indexes[-1] if indexes else 0
        self._segments.setdefault(self._current, (0, 0))
        self._used = sum(size for size, _ in self._segments.values())
        self._open(self._current)

    def _open(self, index: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self._path(index), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
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

    def _scan(self, index: int, start: int = 0) -> Iterator[tuple[Record, int]]:
        """Records of one segment from byte ``start``, each with the offset after it."""
        try:
            f = open(self._path(index), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return
        with f:
            f.seek(start)
            pos = start
            while True:
                head = f.read(_HEAD.size)
                if len(head) < _HEAD.size:
                    return
                magic, kind, seq, offset, length, plen = _HEAD.unpack(head)
                if magic != MAGIC or kind not in Kind._value2member_map_:
                    return
                payload = f.read(plen)
                crc = f.read(_CRC.size)
                if len(payload) < plen or len(crc) < _CRC.size:
                    return
                if _CRC.unpack(crc)[0] != zlib.crc32(head + payload):
                    return
                pos += _HEAD.size + plen + _CRC.size
                yield Record(Kind(kind), seq, offset, length, payload), pos

    # ------------------------------------------------------------ writing

    @property
    def used(self) -> int:
        return self._used

    def append(self, record: Record) -> None:
        """Append in sequence order (the caller holds the sequencer lock).

        A STOP record is taken even over the limit: after a crash it tells that
        what followed was not journalled.
        """
        data = record.encode()
        with self._lock:
            if self._used + len(data) > self.limit and record.kind != Kind.STOP:
                raise JournalFull(f"replication journal full ({self._used} of {self.limit} "
                                  "bytes)")
            size, _ = self._segments[self._current]
            if size and size + len(data) > SEGMENT_BYTES:
                self._current += 1
                size = 0
            self._pending.append((self._current, data, record.seq))
            self._segments[self._current] = (size + len(data), record.seq)
            self._used += len(data)
            self.last_seq = record.seq
            self.stopped = record.kind == Kind.STOP
            self._mem.append(record.kept(data))
            self._mem_seqs.append(record.seq)
            self._mem_bytes += len(data)
            while self._mem_bytes > MEMORY_BYTES and self._mem_start < len(self._mem):
                dropped = self._mem[self._mem_start]
                self._mem_start += 1
                self._mem_bytes -= dropped.size
                self._disk_only_upto = dropped.seq
            self._compact_mem()
            self._appended.notify_all()
        if record.kind == Kind.STOP:
            self.persist()  # start-up after a crash must see it

    def persist(self, upto_seq: int | None = None) -> None:
        """Write the queued records to the file, in order (before a host is answered)."""
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
                    start = stop
            except OSError:
                with self._lock:  # not written: they stay queued, and the caller fails
                    self._pending[:0] = pending[start:]
                raise

    def _write_all(self, datas: list[bytes]) -> None:
        """pwritev until every byte is in the file (a short write leaves no gap)."""
        total = sum(len(d) for d in datas)
        done = os.pwritev(self._fd, datas, self._fd_end)
        while done < total:  # rare: only then is the batch joined
            n = os.pwrite(self._fd, memoryview(b"".join(datas))[done:], self._fd_end + done)
            if n <= 0:
                raise OSError(errno.EIO, "replication journal: nothing written")
            done += n
        self._fd_end += total

    def sync(self) -> None:
        """Persist, then make the journal durable (a host's FLUSH or FUA write)."""
        self.persist()
        with self._io_lock:
            if self._fd >= 0:
                os.fdatasync(self._fd)

    def wait_for(self, after_seq: int, timeout: float) -> bool:
        """Wait until a record numbered above ``after_seq`` is in the journal."""
        with self._lock:
            return self._appended.wait_for(lambda: self.last_seq > after_seq, timeout)

    # ------------------------------------------------------------ reading and trimming

    def _compact_mem(self) -> None:
        if self._mem_start > 4096 and self._mem_start * 2 > len(self._mem):
            del self._mem[: self._mem_start]
            del self._mem_seqs[: self._mem_start]
            self._mem_start = 0

    def _forget_mem(self, upto_seq: int) -> None:
        """Records up to ``upto_seq`` will not be read again (lock held)."""
        i = bisect.bisect_right(self._mem_seqs, upto_seq, self._mem_start)
        for record in self._mem[self._mem_start : i]:
            self._mem_bytes -= record.size
        self._mem_start = i
        self._disk_only_upto = max(self._disk_only_upto, upto_seq)
        self._compact_mem()

    def records_after(
        self, seq: int, cursor: tuple[int, int] | None = None,
    ) -> Iterator[tuple[Record, tuple[int, int] | None]]:
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
            for record in batch:
                yield record, None
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
            for record, end in self._scan(index, start):
                if record.seq > seq:
                    yield record, (index, end)

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
        with self._io_lock, self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
