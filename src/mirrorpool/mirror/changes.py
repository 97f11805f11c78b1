"""Changed-block tracking: which chunks of a primary were written between splits.

The log keeps one chunk set per generation, D[g]: the chunks written by
mutations numbered after the previous split and before the split that made
generation g, plus the open set for mutations since the last split.  From
these follow what a recycled backup must copy (everything written since its
own split), what differs between two generations, and the changed-block
metadata context offered to backup tools.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from pyroaring import BitMap

CHUNK = 4 * 1024  # tracking, copy-before-write and resync granularity


def chunk_span(offset: int, length: int) -> tuple[int, int]:
    """First chunk and one past the last chunk touched by [offset, offset+length)."""
    return offset // CHUNK, (offset + length + CHUNK - 1) // CHUNK


def chunk_runs(chunks: BitMap, max_run: int | None = None) -> Iterator[tuple[int, int]]:
    """Runs of consecutive chunks as (first, count), split at ``max_run``."""
    start = prev = None
    for c in chunks:
        if start is not None and c == prev + 1 and (max_run is None or c - start < max_run):
            prev = c
            continue
        if start is not None:
            yield start, prev - start + 1
        start = prev = c
    if start is not None:
        yield start, prev - start + 1


def chunk_array(chunks: BitMap) -> np.ndarray:
    """The chunks as an ascending uint32 array."""
    return np.frombuffer(chunks.to_array(), dtype=np.uint32)


def array_runs(chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of consecutive chunks in an ascending array: (first chunks, counts)."""
    if not len(chunks):
        return chunks, chunks
    breaks = np.flatnonzero(np.diff(chunks) != 1) + 1
    starts = np.concatenate(([0], breaks))
    counts = np.diff(np.concatenate((starts, [len(chunks)])))
    return chunks[starts], counts


def split_runs(chunks: BitMap, long: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Chunks in runs shorter than ``long`` (an array), and the longer runs as (first, count)."""
    array = chunk_array(chunks)
    firsts, counts = array_runs(array)
    is_long = counts >= long
    if not is_long.any():
        return array, []
    return (array[np.repeat(~is_long, counts)],
            list(zip(firsts[is_long].tolist(), counts[is_long].tolist(), strict=True)))


def next_set(chunks: BitMap, start: int) -> int | None:
    """The smallest chunk in ``chunks`` at or after ``start``, if any."""
    try:
        return chunks.next_set_bit(start)
    except ValueError:
        return None


def byte_extents(
    chunks: BitMap, size: int, offset: int, length: int
) -> list[tuple[int, int, bool]]:
    """(offset, length, changed) runs covering [offset, offset+length), clipped to ``size``."""
    end = min(offset + length, size)
    last_chunk = (end + CHUNK - 1) // CHUNK
    out: list[tuple[int, int, bool]] = []
    pos = offset
    while pos < end:
        c = pos // CHUNK
        changed = c in chunks
        nxt = c + 1
        if changed:
            while nxt < last_chunk and nxt in chunks:
                nxt += 1
        else:
            following = next_set(chunks, nxt)
            nxt = last_chunk if following is None else min(following, last_chunk)
        stop = min(nxt * CHUNK, end)
        out.append((pos, stop - pos, changed))
        pos = stop
    return out


class ChangeLog:
    def __init__(self, deltas: dict[int, BitMap] | None = None, open_set: BitMap | None = None):
        self.deltas: dict[int, BitMap] = deltas or {}
        self.open = open_set if open_set is not None else BitMap()

    def mark(self, offset: int, length: int) -> None:
        first, stop = chunk_span(offset, length)
        self.open.add_range(first, stop)

    def close(self, gen: int) -> BitMap:
        """The split that makes ``gen`` ends the open set; returns it as D[gen]."""
        closed = self.open
        self.deltas[gen] = closed
        self.open = BitMap()
        return closed

    def since(self, gen: int | None) -> BitMap:
        """Chunks written after the split of ``gen`` up to now (None: since the start)."""
        sets = [d for g, d in self.deltas.items() if gen is None or g > gen]
        return BitMap.union(self.open, *sets) if sets else BitMap(self.open)

    def between(self, older: int, newer: int) -> BitMap:
        """Chunks written after generation ``older`` and before generation ``newer``."""
        sets = [d for g, d in self.deltas.items() if older < g <= newer]
        return BitMap.union(*sets) if sets else BitMap()

    def prune(self, keep_after: int) -> list[int]:
        """Forget D[g] for g <= keep_after (no live generation needs them)."""
        gone = [g for g in self.deltas if g <= keep_after]
        for g in gone:
            del self.deltas[g]
        return gone


def chunks_of(ranges: Iterable[tuple[int, int]]) -> BitMap:
    bm = BitMap()
    for offset, length in ranges:
        first, stop = chunk_span(offset, length)
        bm.add_range(first, stop)
    return bm
