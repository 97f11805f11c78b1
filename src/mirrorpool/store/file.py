"""A block store on a sparse regular file or a raw block device."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
import threading

import numpy as np

from mirrorpool.nbd.constants import AllocationFlag, Errno
from mirrorpool.store.base import BlockStore, Extent, FastZeroUnsupported, StoreError

try:
    from mirrorpool.store import _chunkcopy
except ImportError:  # built without a C compiler: the same copies, through Python
    _chunkcopy = None  # type: ignore[assignment]

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_BLKGETSIZE64 = 0x80081272
_ZERO_CHUNK = 1 << 20
# Big writes go to the kernel in pieces of at most this size.  The page cache sizes
# a new folio by the write that creates it, and ext4 then walks every buffer head
# of a folio on each later small write into it: after 1 MiB writes, a 4 KiB write
# costs 8 to 19 us instead of 2 to 4 (BENCHMARKS.md, "Replication").  256 KiB keeps
# big writes within a few per cent of one call.
WRITE_PIECE = 256 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def device_size(path: str) -> int:
    """Size in bytes of a regular file or a block device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
            return struct.unpack("Q", buf)[0]
        return st.st_size
    finally:
        os.close(fd)


_copy_buffers = threading.local()  # resyncs and copy-before-write run in several threads
COPY_BUFFER = 256 * 1024


def _copy_buffer() -> memoryview:
    buf: memoryview | None = getattr(_copy_buffers, "buf", None)
    if buf is None:
        buf = _copy_buffers.buf = memoryview(bytearray(COPY_BUFFER))
    return buf


def copy_chunks(src: BlockStore, dst: BlockStore, chunks: np.ndarray, chunk: int,
                limit: int) -> int:
    """Copy the numbered chunks from ``src`` to ``dst`` at the same offsets; bytes copied.

    ``chunks`` ascend (a uint32 array); nothing at or past ``limit`` is copied,
    and in C consecutive chunks go as one run.  A source shorter than ``limit``
    reads as zeros.  Between two files this runs in C without the interpreter
    lock (per 4 KiB chunk about 5 us against 12 in Python, and none of the
    lock hand-offs with the threads serving hosts); other stores, such as the
    fault-injection one, go through their own read and write.
    """
    if _chunkcopy is not None and type(src) is FileStore and type(dst) is FileStore:
        try:
            return int(_chunkcopy.copy_chunks(
                src.fd, dst.fd, np.ascontiguousarray(chunks, dtype=np.uint32), chunk, limit))
        except OSError as exc:
            side, offset = getattr(exc, "where", ("copy", 0))
            raise StoreError.from_os_error(exc, f"copy ({side}) at {offset}") from exc
    buf = _copy_buffer()
    copied = 0
    for c in np.asarray(chunks, dtype=np.uint32).tolist():
        start = c * chunk
        piece = buf[: max(0, min(chunk, limit - start))]
        if piece:
            src.read_into(piece, start)
            dst.write(piece, start)
            copied += len(piece)
    return copied


class FileStore:
    """Reads and writes with preadv/pwritev on one shared descriptor.

    Every connection to an LU shares the descriptor, so all of them see one
    store through the page cache (what makes NBD multi-conn safe).
    """

    def __init__(self, path: str, size: int | None = None, direct: bool = False) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        self._fd = os.open(path, flags)
        st = os.fstat(self._fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self._size = size if size is not None else device_size(path)
        self._zero_range_ok = True
        self._punch_ok = True
        self._zeros = bytes(_ZERO_CHUNK)
        self._lock = threading.Lock()  # only for resize

    @classmethod
    def create(cls, path: str, size: int) -> FileStore:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(path, size)

    @property
    def size(self) -> int:
        return self._size

    @property
    def fd(self) -> int:
        return self._fd

    def read_into(self, buf: memoryview, offset: int) -> None:
        want = len(buf)
        done = 0
        try:
            while done < want:
                n = os.preadv(self._fd, [buf[done:]], offset + done)
                if n == 0:  # a backing file shorter than the LU reads as zeros
                    buf[done:] = bytes(want - done)
                    return
                done += n
        except OSError as exc:
            raise StoreError.from_os_error(exc, f"read at {offset}") from exc

    def write(self, data: memoryview | bytes, offset: int, fua: bool = False) -> None:
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += os.pwritev(self._fd, [view[done : done + WRITE_PIECE]], offset + done)
            if fua:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise StoreError.from_os_error(exc, f"write at {offset}") from exc

    def zero(
        self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        if length == 0:
            return
        try:
            if may_trim and self._punch_ok and self._try_fallocate(
                _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length, "_punch_ok"
            ) or self._zero_range_ok and self._try_fallocate(
                _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length, "_zero_range_ok"
            ):
                pass
            elif fast:
                raise FastZeroUnsupported()
            else:
                self._write_zeros(offset, length)
            if fua:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise StoreError.from_os_error(exc, f"zero at {offset}") from exc

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # Trimmed blocks read back as zeros here, which the protocol allows.
        if length == 0:
            return
        try:
            if self._punch_ok:
                self._try_fallocate(
                    _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length, "_punch_ok"
                )
            if fua:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise StoreError.from_os_error(exc, f"trim at {offset}") from exc

    def flush(self) -> None:
        try:
            os.fdatasync(self._fd)
        except (OSError, ValueError) as exc:
            if isinstance(exc, ValueError):
                raise StoreError(Errno.EIO, "flush: the store is closed") from exc
            raise StoreError.from_os_error(exc, "flush") from exc

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def release(self) -> None:
        self.flush()  # dirty pages cannot be dropped
        try:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise StoreError.from_os_error(exc, "drop cache") from exc

    def extents(self, offset: int, length: int, limit: int | None = None) -> list[Extent]:
        end = min(offset + length, self._size)
        if self.is_block_device:
            return [Extent(offset, end - offset, AllocationFlag(0))]
        out: list[Extent] = []
        pos = offset
        try:
            while pos < end and (limit is None or len(out) < limit):
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = end  # only a hole from here to the end of file
                if data > pos:
                    stop = min(data, end)
                    out.append(Extent(pos, stop - pos, AllocationFlag.HOLE | AllocationFlag.ZERO))
                    pos = stop
                    continue
                hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
                stop = min(hole, end)
                out.append(Extent(pos, stop - pos, AllocationFlag(0)))
                pos = stop
        except OSError as exc:
            raise StoreError.from_os_error(exc, f"extents at {offset}") from exc
        return out

    def resize(self, size: int) -> None:
        with self._lock:
            if self.is_block_device:
                if size > device_size(self.path):
                    raise StoreError.from_os_error(
                        OSError(errno.ENOSPC, "block device is smaller"), "resize"
                    )
            elif os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
                os.fsync(self._fd)
            self._size = size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ---------------------------------------------------------------- helpers

    def _try_fallocate(self, mode: int, offset: int, length: int, support_flag: str) -> bool:
        try:
            _fallocate(self._fd, mode, offset, length)
            return True
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                setattr(self, support_flag, False)
                return False
            raise

    def _write_zeros(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            self.write(memoryview(self._zeros)[:n], offset)
            offset += n
