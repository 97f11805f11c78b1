"""Per-chunk digests, so two copies of an LU can be compared without sending the data.

Both sides hash the same chunk grid (the change-tracking chunk); only the chunks
whose digests differ are copied.  BLAKE2b with 16-byte digests: fast in CPython,
and a collision between two versions of a chunk is not a practical concern.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from pyroaring import BitMap

from mirrorpool.mirror.changes import CHUNK

DIGEST = 16
READ_STEP = 1 << 20
MAX_RANGE = 256 << 20  # one request's worth: 1 MiB of digests

ReadInto = Callable[[memoryview, int], None]


def chunk_digests(read_into: ReadInto, size: int, offset: int, length: int) -> bytes:
    """Digests of the chunks in [offset, offset+length) (chunk-aligned; clipped at size)."""
    if offset % CHUNK or length % CHUNK and offset + length < size:
        raise ValueError(f"offset and length must be multiples of {CHUNK}")
    end = min(offset + length, size)
    out = bytearray()
    buf = bytearray(READ_STEP)
    for start in range(offset, end, READ_STEP):
        view = memoryview(buf)[: min(READ_STEP, end - start)]
        read_into(view, start)
        out += digests_of(view)
    return bytes(out)


def digests_of(data: bytes | bytearray | memoryview) -> bytes:
    """Digests of each CHUNK of ``data`` (the last one may be short)."""
    view = memoryview(data)
    blake2b = hashlib.blake2b
    return b"".join(blake2b(view[i : i + CHUNK], digest_size=DIGEST).digest()
                    for i in range(0, len(view), CHUNK))


def differing(first_chunk: int, mine: bytes, theirs: bytes) -> BitMap:
    """Chunks (numbered from ``first_chunk``) whose digests differ."""
    if len(mine) != len(theirs):
        raise ValueError("digest lists of different lengths")
    out = BitMap()
    for i in range(0, len(mine), DIGEST):
        if mine[i : i + DIGEST] != theirs[i : i + DIGEST]:
            out.add(first_chunk + i // DIGEST)
    return out
