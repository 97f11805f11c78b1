"""The block-store interface every layer implements."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Protocol

from mirrorpool.nbd.constants import AllocationFlag, Errno


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with the same allocation state (NBD base:allocation flags)."""

    offset: int
    length: int
    flags: AllocationFlag

    @property
    def end(self) -> int:
        return self.offset + self.length


class StoreError(Exception):
    """An I/O failure, carrying the NBD error the host should see."""

    def __init__(self, code: Errno, message: str) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_os_error(cls, exc: OSError, what: str) -> StoreError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            code = Errno.ENOSPC
        elif exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
            code = Errno.EPERM
        elif exc.errno == errno.EINVAL:
            code = Errno.EINVAL
        else:
            code = Errno.EIO
        return cls(code, f"{what}: {exc.strerror or exc}")


class FastZeroUnsupported(StoreError):
    """WRITE_ZEROES with FAST_ZERO asked for a zeroing this store cannot do quickly."""

    def __init__(self) -> None:
        super().__init__(Errno.ENOTSUP, "fast zero not possible here")


class BlockStore(Protocol):
    """A fixed-size byte address space.  Offsets and lengths are checked by the caller."""

    @property
    def size(self) -> int: ...

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` entirely with the bytes at ``offset``."""

    def write(self, data: memoryview | bytes, offset: int, fua: bool = False) -> None: ...

    def zero(
        self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        """Make the range read as zeros; ``fast`` raises FastZeroUnsupported if it would be slow."""

    def trim(self, offset: int, length: int, fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def cache(self, offset: int, length: int) -> None: ...

    def release(self) -> None:
        """Write the store back and drop it from memory caches (it will not be read soon)."""

    def extents(self, offset: int, length: int, limit: int | None = None) -> list[Extent]:
        """Allocation of [offset, offset+length) from the start, at most ``limit`` runs."""

    def resize(self, size: int) -> None: ...

    def close(self) -> None: ...
