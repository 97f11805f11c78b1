"""The per-primary I/O queue: sequence numbers and ordering of overlapping work.

Every mutation and every TRIGGER gets the next sequence number when the device
has received it whole (``admit``).  Work on overlapping byte ranges runs in
admission order: an operation waits only for earlier operations whose range
overlaps its own, so disjoint work runs concurrently and there is no global
lock on the data path.  Internal work (resync copies, copy-before-write reads
of a generation) is admitted too, without a sequence number, so it is ordered
against host writes the same way.

A TRIGGER does not wait in the queue and does not block later work: it takes a
snapshot of everything admitted before it, and it "reaches the head of the
queue" when all of that has finished.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Op:
    """One admitted piece of work on [start, end)."""

    __slots__ = ("seq", "start", "end", "parts", "deps", "event", "finished", "target", "kind",
                 "cow")

    def __init__(self, seq: int | None, start: int, end: int, deps: list[Op], kind: str,
                 parts: list[tuple[int, int]] | None = None) -> None:
        self.seq = seq
        self.start = start  # [start, end) bounds the work; ``parts``, if any, are exact
        self.end = end
        self.parts = parts
        self.deps = deps
        self.event: threading.Event | None = None
        self.finished = False
        self.target: object | None = None  # the active backup the mutation also goes to
        self.kind = kind
        # generations to copy-before-write into, with their epochs, as of admission
        self.cow: list[tuple[object, int]] | None = None


def _overlaps(parts: list[tuple[int, int]], start: int, end: int) -> bool:
    """Does [start, end) overlap one of ``parts`` (disjoint, ascending)?"""
    lo, hi = 0, len(parts)
    while lo < hi:  # the first part ending after ``start``
        mid = (lo + hi) // 2
        if parts[mid][1] <= start:
            lo = mid + 1
        else:
            hi = mid
    return lo < len(parts) and parts[lo][0] < end


class Sequencer:
    def __init__(self, next_seq: int = 1) -> None:
        # The lock also guards the pool state that must change at one point in
        # the sequence (which member is active, the open change set).
        self.lock = threading.RLock()
        self.next_seq = next_seq
        self._inflight: list[Op] = []

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    def skip_past(self, seq: int) -> None:
        """Number what comes next above ``seq`` (one used before a crash, say)."""
        with self.lock:
            self.next_seq = max(self.next_seq, seq + 1)

    def admit(
        self,
        start: int,
        end: int,
        kind: str = "write",
        numbered: bool = True,
        on_admit: Callable[[Op], None] | None = None,
    ) -> Op:
        """Queue work on [start, end); ``on_admit`` runs at its exact place in the sequence."""
        with self.lock:
            deps = [o for o in self._inflight if o.start < end and start < o.end
                    and (o.parts is None or _overlaps(o.parts, start, end))]
            for dep in deps:
                if dep.event is None:
                    dep.event = threading.Event()
            if numbered:
                seq: int | None = self.next_seq
                self.next_seq += 1
            else:
                seq = None
            op = Op(seq, start, end, deps, kind)
            self._inflight.append(op)
            if on_admit is not None:
                on_admit(op)
        return op

    def admit_parts(self, parts: list[tuple[int, int]], kind: str) -> Op:
        """Queue unnumbered work on several disjoint ranges, in ascending order, as one op."""
        with self.lock:
            start, end = parts[0][0], parts[-1][1]
            # Host writes wait behind this lock: a binary search per op in flight,
            # not a scan of every part.
            deps = [o for o in self._inflight if o.start < end and start < o.end
                    and (_overlaps(parts, o.start, o.end) if o.parts is None
                         else any(_overlaps(o.parts, s, e) for s, e in parts))]
            for dep in deps:
                if dep.event is None:
                    dep.event = threading.Event()
            op = Op(None, start, end, deps, kind, parts)
            self._inflight.append(op)
        return op

    def admit_barrier(self, on_admit: Callable[[Op], None] | None = None) -> tuple[Op, list[Op]]:
        """Number a TRIGGER; returns it and the work admitted before it."""
        with self.lock:
            # only numbered mutations make up the prefix; copies and reads need no wait
            earlier = self.numbered_inflight()
            for dep in earlier:
                if dep.event is None:
                    dep.event = threading.Event()
            op = Op(self.next_seq, 0, 0, earlier, "trigger")
            self.next_seq += 1
            op.finished = True
            if on_admit is not None:
                on_admit(op)
        return op, earlier

    @staticmethod
    def wait(op: Op) -> None:
        """Block until every earlier overlapping operation has finished."""
        for dep in op.deps:
            if not dep.finished:
                dep.event.wait()  # type: ignore[union-attr]
        op.deps = []

    def finish(self, op: Op, on_finish: Callable[[Op], None] | None = None) -> None:
        with self.lock:
            if on_finish is not None:
                on_finish(op)
            self._inflight.remove(op)
            op.finished = True
            event = op.event
        if event is not None:
            event.set()

    def numbered_inflight(self) -> list[Op]:
        """Mutations and triggers admitted and not yet finished."""
        with self.lock:
            return [o for o in self._inflight if o.seq is not None]

    def inflight(self) -> int:
        with self.lock:
            return len(self._inflight)
