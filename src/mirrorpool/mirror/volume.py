"""A primary LU mirrored to its backup pool.

Every mutation is admitted to the sequencer, marked in the change log and
bound to the active backup of that moment; it is then applied to the primary
and to that backup before the host's reply.  A split is a metadata step taken
at the trigger's place in the sequence: the active backup freezes as a
generation, the least recently used member becomes the active backup, and
later mutations go there.  The new active backup copies, in the background,
only the chunks written since its own split.  Chunks a frozen generation still
lacks are kept by copy-before-write until its copy is complete.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pyroaring import BitMap

from mirrorpool.errors import Conflict, NotFound
from mirrorpool.mirror.changes import (
    CHUNK,
    ChangeLog,
    array_runs,
    chunk_array,
    chunk_span,
    next_set,
    split_runs,
)
from mirrorpool.mirror.journal import Journal, SplitRecord
from mirrorpool.mirror.pool import Member, MemberState, recycle_order
from mirrorpool.mirror.sequencer import Op, Sequencer
from mirrorpool.nbd.constants import AllocationFlag
from mirrorpool.store import Extent, FileStore, StoreError
from mirrorpool.store.file import copy_chunks

log = logging.getLogger("mirrorpool.mirror")

COPY_RUN = 256  # chunks per background copy step (1 MiB), in as many runs as they make
PARALLEL_WRITE = 256 * 1024  # from this size the backup is written beside the primary
SPARSE_COPY = 256 * 1024  # copies from this size look for holes first
# While hosts write, resync steps take at most this share of the resync thread's
# time (1: no limit); with no host writes the resync always runs at full speed.
RESYNC_SHARE = 0.5
MIN_SHARE = 0.05
MAX_PAUSE = 0.1  # seconds: one slow step must not hold a resync back for long
_mirror_io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mirror-io")


def member_differs(member: Member, changes: ChangeLog, primary: FileStore, size: int) -> BitMap:
    """Chunks where ``member`` may differ from the primary now."""
    nchunks = (size + CHUNK - 1) // CHUNK
    if member.state is MemberState.FAILED:
        return BitMap(range(nchunks))
    if member.state is MemberState.SPARE:
        allocated = BitMap()
        for ext in primary.extents(0, size):
            if not ext.flags & AllocationFlag.HOLE:
                first, stop = chunk_span(ext.offset, ext.length)
                allocated.add_range(first, stop)
        return allocated | changes.since(None)
    return changes.since(member.gen) | member.pending


class TriggerRefused(Conflict):
    """No consistent backup can be made now; nothing was changed."""


@dataclass
class SplitPlan:
    volume: MirroredVolume
    gen_member: Member
    next_active: Member | None
    op: Op | None = None
    earlier: list[Op] | None = None
    gen: int = 0
    delta: BitMap | None = None
    received: float = 0.0
    split_s: float = 0.0  # received -> readable
    settle_s: float = 0.0  # received -> every earlier mutation finished
    # what the trigger says of itself, noted in the crash journal with the split
    trigger_id: str = ""
    label: str = ""
    source: str = ""
    created: float = 0.0
    recycled: list[int] = field(default_factory=list)


class MirroredVolume:
    def __init__(
        self,
        name: str,
        primary: FileStore,
        members: list[Member],
        changes: ChangeLog,
        next_seq: int,
        next_gen: int,
        persist: Callable[[MirroredVolume], None] | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.name = name
        self.journal = journal
        self._written: set[Member] = set()  # members written since the last flush
        self.on_generation_lost: Callable[[int], None] | None = None
        self.failures = 0
        self.primary = primary
        self.members = members
        self.changes = changes
        self.seq = Sequencer(next_seq)
        self.next_gen = next_gen
        self._persist = persist
        self.active: Member | None = next(
            (m for m in members if m.state is MemberState.ACTIVE), None
        )
        for m in members:
            if m.state is MemberState.GENERATION:
                m.split_done.set()
        self._cow: list[Member] = [
            m for m in members if m.state is MemberState.GENERATION and m.pending
        ]
        self._copy_wanted = threading.Condition()
        self._drop_lock = threading.Lock()  # cache-drop threads start and are handed over under it
        self._closed = False
        self._stopping = False
        # Operators may hold resync back (e.g. at peak load); exactness does not depend on it.
        self.resync_paused = False
        self.resync_share = RESYNC_SHARE
        self.mutations = 0  # admitted so far: the resync yields while this moves
        self._copied_bytes = 0
        self._copy_started = 0.0
        # trigger received -> generation readable, and -> every earlier mutation done
        self.split_latencies: list[float] = []
        self.settle_latencies: list[float] = []
        self.last_trigger: dict | None = None
        self._resync = threading.Thread(target=self._resync_loop, name=f"resync-{name}",
                                        daemon=True)
        self._resync.start()

    @property
    def size(self) -> int:
        return self.primary.size

    # ------------------------------------------------------------ data path

    def begin(self, offset: int, length: int,
              journal: Callable[[int], None] | None = None) -> Op:
        """Admit a mutation; call where the request was received whole, in order.

        The order is kept per whole chunk, because copy-before-write and resync
        copy whole chunks.  ``journal`` is called with the mutation's sequence
        number at its place in the sequence (replication journals).
        """
        first, stop = chunk_span(offset, length)
        if journal is None:
            return self.seq.admit(first * CHUNK, stop * CHUNK, "write", True, self._on_admit)

        def on_admit(op: Op) -> None:
            self._on_admit(op)
            journal(op.seq or 0)

        return self.seq.admit(first * CHUNK, stop * CHUNK, "write", True, on_admit)

    def _on_admit(self, op: Op) -> None:
        first, stop = op.start // CHUNK, op.end // CHUNK
        self.mutations += 1
        if self.journal is not None:
            self.journal.begin(first, stop)
        self.changes.open.add_range(first, stop)
        target = self.active
        op.target = target
        if self._cow:
            op.cow = [(m, m.epoch) for m in self._cow]
        if target is not None:
            self._written.add(target)

    def _on_finish(self, op: Op) -> None:
        if self.journal is not None:
            self.journal.end(op.start // CHUNK, op.end // CHUNK)

    def _finish(self, op: Op) -> None:
        self.seq.finish(op, self._on_finish)

    def write(self, op: Op, data: memoryview | bytes, offset: int, fua: bool = False) -> None:
        self.seq.wait(op)
        try:
            if op.cow:
                self._copy_before_write(op)
            target = op.target
            if target is not None and len(data) >= PARALLEL_WRITE:
                # big copies into the page cache run on both cores at once
                backup = _mirror_io.submit(target.store.write, data, offset, fua)  # type: ignore[attr-defined]
                try:
                    self.primary.write(data, offset, fua)
                finally:
                    try:
                        backup.result()
                    except StoreError as exc:
                        self._member_failed(target, exc)  # type: ignore[arg-type]
                return
            self.primary.write(data, offset, fua)
            if target is not None:
                try:
                    target.store.write(data, offset, fua)  # type: ignore[attr-defined]
                except StoreError as exc:
                    self._member_failed(target, exc)  # type: ignore[arg-type]
        finally:
            self._finish(op)

    def zero(
        self, op: Op, offset: int, length: int, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        self._apply(op, lambda s: s.zero(offset, length, may_trim, fast, fua))

    def trim(self, op: Op, offset: int, length: int, fua: bool = False) -> None:
        # A trimmed range reads as zeros on every copy, so primary and backup stay equal.
        self._apply(op, lambda s: s.trim(offset, length, fua))

    def _apply(self, op: Op, action: Callable[[FileStore], None]) -> None:
        self.seq.wait(op)
        try:
            if op.cow:
                self._copy_before_write(op)
            action(self.primary)
            target = op.target
            if target is not None:
                try:
                    action(target.store)  # type: ignore[attr-defined]
                except StoreError as exc:
                    self._member_failed(target, exc)  # type: ignore[arg-type]
        finally:
            self._finish(op)

    def abandon(self, op: Op) -> None:
        """A mutation admitted but refused before it touched anything."""
        self._finish(op)

    def flush(self) -> None:
        """Make every acknowledged write durable on the primary and on each copy it reached."""
        with self.seq.lock:
            written = list(self._written)
            self._written.clear()
            if self.active is not None:
                written.append(self.active)
        self.primary.flush()
        for member in set(written):
            if member.state is MemberState.FAILED:
                continue
            try:
                member.store.flush()
            except StoreError as exc:
                self._member_failed(member, exc)

    def read_into(self, buf: memoryview, offset: int) -> None:
        self.primary.read_into(buf, offset)

    def _member_failed(self, member: Member, exc: StoreError) -> None:
        with self.seq.lock:
            if member.state is MemberState.FAILED:
                return
            log.error("backup member failed", extra={"lu": self.name, "member": member.idx,
                                                     "gen": member.gen, "error": str(exc)})
            lost = member.gen if member.state is MemberState.GENERATION else None
            member.state = MemberState.FAILED
            member.gen = None
            self.failures += 1
            member.pending = BitMap()  # a failed member is copied in full when reused
            member.epoch += 1
            with contextlib.suppress(OSError):
                member.save_pending()
            if member in self._cow:
                self._cow.remove(member)
            if self.active is member:
                self.active = None
        if lost is not None and self.on_generation_lost is not None:
            self.on_generation_lost(lost)  # never offered as good again
        self._save()
        # a spare takes over at once; failed members wait for `lu repair` or a trigger
        self.ensure_active(retry_failed=False)

    # ------------------------------------------------------------ copy-before-write

    def _copy_before_write(self, op: Op) -> None:
        """Keep the generations frozen before this mutation exact: copy what they lack.

        Only generations frozen when the mutation was admitted take part, each
        with the epoch it had then; a split since then may have made one of them
        the active backup, which the mutation does not reach (see _copy_chunks).
        """
        if not op.cow:
            return
        first, stop = op.start // CHUNK, op.end // CHUNK
        for member, epoch in op.cow:
            pending: BitMap = member.pending  # type: ignore[attr-defined]
            nxt = next_set(pending, first)
            if nxt is None or nxt >= stop:
                continue  # the usual case: nothing of this range is still missing
            wanted = pending.intersection(BitMap(range(first, stop)))
            if wanted:
                self._copy_chunks(member, wanted, epoch)  # type: ignore[arg-type]

    def _copy_chunks(self, member: Member, chunks: BitMap, epoch: int | None = None) -> None:
        """Copy chunks from the primary into ``member``; the caller holds their order.

        A split may mark the same chunks pending again while the copy runs (the
        member is recycled, and a write ordered after this copy will not reach
        it); then the bits stay, and the chunks are copied again later.
        """
        if epoch is None:
            epoch = member.epoch
        self._copy_data(member, chunks)
        if self.journal is not None and self.journal.sync:
            # power-loss safe mode: the copy is on disk before its bits may be cleared
            member.store.flush()
        with self.seq.lock:
            if member.epoch != epoch:
                return
            member.pending -= chunks
            member.pending_cleared(chunks)
        if not member.pending:
            self._sync_complete(member)

    def _copy_data(self, member: Member, chunks: BitMap) -> None:
        """The chunks' bytes, primary to member: scattered ones in one call, long runs sparsely."""
        scattered, long_runs = split_runs(chunks, SPARSE_COPY // CHUNK)
        if len(scattered):
            self._copied_bytes += copy_chunks(self.primary, member.store, scattered, CHUNK,
                                              self.size)
        for first, count in long_runs:
            start = first * CHUNK
            length = min(count * CHUNK, self.size - start)
            self._copy_sparse(member, start, length)
            self._copied_bytes += length

    def _copy_sparse(self, member: Member, start: int, length: int) -> None:
        """A long run, primary to member: holes are punched, not copied."""
        src, dst = self.primary, member.store
        member.bulk_copied = True
        for ext in src.extents(start, length):
            if ext.flags & AllocationFlag.HOLE:
                dst.zero(ext.offset, ext.length, may_trim=True)
            else:
                buf = bytearray(ext.length)
                src.read_into(memoryview(buf), ext.offset)
                dst.write(buf, ext.offset)

    def _sync_complete(self, member: Member) -> None:
        with self.seq.lock:
            if member in self._cow:
                self._cow.remove(member)
        log.info("backup in sync" if member.state is MemberState.ACTIVE else "generation complete",
                 extra={"lu": self.name, "member": member.idx, "gen": member.gen})

    # ------------------------------------------------------------ split

    def plan_split(self) -> SplitPlan:
        """Choose the members of a split; the caller holds ``self.seq.lock``."""
        if not self.members:
            raise TriggerRefused(f"LU {self.name!r} has no backup pool (pool 0): nothing to split")
        gen_member = self.active
        if gen_member is None:
            order = recycle_order(self.members)
            if not order:
                reasons = "; ".join(m.why_kept() for m in self.members)
                raise TriggerRefused(
                    f"LU {self.name!r}: no backup can be recycled to hold the copy ({reasons})"
                )
            gen_member = order[0]
        others = recycle_order(self.members, exclude=gen_member)
        next_active = others[0] if others else None
        if next_active is None and len(self.members) > 1:
            reasons = "; ".join(m.why_kept() for m in self.members if m is not gen_member)
            raise TriggerRefused(
                f"LU {self.name!r}: no pool member can take over as active backup ({reasons});"
                " unpin a generation, close its export or grow the pool"
            )
        return SplitPlan(self, gen_member, next_active)

    def apply_split(self, plan: SplitPlan) -> None:
        """Take the split at this exact point of the sequence (``self.seq.lock`` held)."""
        op, earlier = self.seq.admit_barrier()
        plan.op, plan.earlier = op, earlier
        member = plan.gen_member
        recycled = member is not self.active
        if recycled:
            lacking = self._differs(member)
            member.epoch += 1
        plan.gen = self.next_gen
        self.next_gen += 1
        if self.journal is not None:
            # noted before any member file changes, so start-up can always finish it
            nxt = plan.next_active
            self.journal.record_split(SplitRecord(
                plan.gen, op.seq or 0, member.idx, nxt.idx if nxt is not None else -1,
                plan.created, plan.trigger_id, plan.source, plan.label, plan.recycled,
            ))
        plan.delta = self.changes.close(plan.gen)
        if self.journal is not None:
            self.journal.rotate()
        member.state = MemberState.GENERATION
        member.gen = plan.gen
        member.frozen_seq = op.seq
        member.last_used = op.seq or 0
        member.split_done = threading.Event()
        member.split_earlier = earlier
        if recycled:  # the active backup's pending file needs nothing: it is kept exact
            member.add_pending(lacking)
        if member.pending and member not in self._cow:
            self._cow.append(member)
        nxt = plan.next_active
        if nxt is not None:
            nxt.add_pending(self._differs(nxt))
            nxt.epoch += 1
            nxt.state = MemberState.ACTIVE
            nxt.gen = None
            nxt.frozen_seq = None
            nxt.copy_total = len(nxt.pending)
            if nxt in self._cow:
                self._cow.remove(nxt)
        self.active = nxt
        if self.journal is not None:
            self.journal.split_applied(plan.gen)
        # readable from here on: a read waits only for earlier mutations it overlaps
        plan.split_s = time.monotonic() - plan.received
        self.split_latencies.append(plan.split_s)
        del self.split_latencies[:-1000]

    def finish_split(self, plan: SplitPlan) -> None:
        """Wait (without blocking other I/O) until the TRIGGER reaches the queue's head."""
        for dep in plan.earlier or []:
            if not dep.finished:
                dep.event.wait()  # type: ignore[union-attr]
        plan.gen_member.split_earlier = []
        plan.gen_member.split_done.set()
        plan.settle_s = time.monotonic() - plan.received
        self.settle_latencies.append(plan.settle_s)
        del self.settle_latencies[:-1000]
        self.wake_resync()

    def remove_members(self, count: int) -> list[Member]:
        """Take ``count`` recyclable members out of the pool, least recently used first.

        They are closed once no work in flight uses them.
        """
        with self.seq.lock:
            removable = recycle_order(self.members)
            if count == len(self.members) and self.active is not None:
                # pool 0: mirroring is switched off, so the active backup goes as well
                removable.append(self.active)
                self.active = None
            if len(removable) < count:
                raise Conflict(
                    f"cannot shrink the pool of {self.name!r} by {count}: only"
                    f" {len(removable)} member(s) are free (the active backup, pinned and"
                    " exported generations stay)"
                )
            members = removable[:count]
            for member in members:
                self.members.remove(member)
                if member in self._cow:
                    self._cow.remove(member)
            _, earlier = self.seq.admit_barrier()
        for op in earlier:
            if not op.finished:
                op.event.wait()  # type: ignore[union-attr]
        for member in members:
            self._join_dropper(member)
            member.store.close()
            if member.pending_file is not None:
                member.pending_file.close()
        return members

    def ensure_active(self, retry_failed: bool = True) -> bool:
        """Give an unmirrored primary an active backup, from blank (or failed) members only."""
        usable = (MemberState.SPARE, MemberState.FAILED) if retry_failed else (MemberState.SPARE,)
        with self.seq.lock:
            if self.active is not None:
                return False
            blank = [m for m in recycle_order(self.members) if m.state in usable]
            if not blank:
                return False
            member = blank[0]
            member.pending = self._differs(member)
            member.epoch += 1
            member.save_pending()
            member.copy_total = len(member.pending)
            member.state = MemberState.ACTIVE
            member.gen = None
            member.frozen_seq = None
            self.active = member
        log.info("active backup chosen", extra={"lu": self.name, "member": member.idx,
                                                 "chunks_to_copy": member.copy_total})
        self._save()
        self.wake_resync()
        return True

    def _differs(self, member: Member) -> BitMap:
        return member_differs(member, self.changes, self.primary, self.size)

    # ------------------------------------------------------------ generations

    def member_of(self, gen: int) -> Member:
        for m in self.members:
            if m.state is MemberState.GENERATION and m.gen == gen:
                return m
        raise NotFound(f"LU {self.name!r} has no generation {gen}")

    def generation_view(self, gen: int) -> GenerationView:
        return GenerationView(self, self.member_of(gen))

    def live_generations(self) -> list[Member]:
        gens = [m for m in self.members if m.state is MemberState.GENERATION]
        return sorted(gens, key=lambda m: m.gen or 0)

    def changed_since(self, gen: int) -> BitMap:
        self.member_of(gen)
        return self.changes.since(gen)

    def changed_between(self, older: int, newer: int) -> BitMap:
        if older > newer:
            older, newer = newer, older
        self.member_of(older)
        self.member_of(newer)
        return self.changes.between(older, newer)

    # ------------------------------------------------------------ resync

    def pause_resync(self, paused: bool) -> None:
        self.resync_paused = paused
        self.wake_resync()

    def wake_resync(self) -> None:
        with self._copy_wanted:
            self._copy_wanted.notify_all()  # the resync thread, and any pause in progress

    def _next_copy(self) -> tuple[Member, BitMap, list[tuple[int, int]]] | None:
        """The next chunks to copy and their runs, frozen generations first (they tax
        host writes).

        Up to COPY_RUN chunks: scattered chunks are copied many per step, yet each
        run is ordered on its own, so a host write waits only if it overlaps one.
        """
        with self.seq.lock:  # held briefly: host writes are admitted under it
            if self.resync_paused:  # checked here too, so a pause holds from its return
                return None
            member = next((m for m in [*self._cow, self.active]
                           if m is not None and m.pending), None)
            if member is None:
                return None
            chosen = member.pending[:COPY_RUN]
        firsts, counts = array_runs(chunk_array(chosen))
        return member, chosen, [(f, f + n) for f, n in zip(firsts.tolist(), counts.tolist(),
                                                            strict=True)]

    def _resync_loop(self) -> None:
        while not self._stopping:
            job = None if self.resync_paused else self._next_copy()
            if job is None:
                with self._copy_wanted:
                    if not self._stopping:
                        self._copy_wanted.wait(1.0)
                continue
            member, chosen, runs = job
            if not self._copy_started:
                self._copy_started = time.monotonic()
            with self.seq.lock:
                # a split after admission may re-mark these chunks for writes that
                # wait behind this copy: the epoch taken at admission tells
                epoch = member.epoch
                op = self.seq.admit_parts([(f * CHUNK, s * CHUNK) for f, s in runs], "copy")
            seen = self.mutations
            copying = 0.0
            try:
                self.seq.wait(op)
                still = chosen & member.pending
                if still and member.state in (MemberState.ACTIVE, MemberState.GENERATION):
                    started = time.monotonic()
                    self._copy_chunks(member, still, epoch)
                    copying = time.monotonic() - started
                    self._written.add(member)
            except StoreError as exc:
                self._member_failed(member, exc)
            except Exception:
                log.exception("resync step failed", extra={"lu": self.name, "member": member.idx})
                time.sleep(1.0)  # do not spin on a persistent fault
            finally:
                self.seq.finish(op)  # a copy never entered the journal: only members change
            if copying and self.mutations != seen and self.resync_share < 1.0:
                # Hosts wrote during the step: leave them the CPU for a while.  At full
                # speed a resync takes a whole core for tens of milliseconds after each
                # trigger, and the writes in flight meanwhile make the latency tail.
                share = max(self.resync_share, MIN_SHARE)
                self._yield_to_hosts(min(MAX_PAUSE, copying * (1.0 / share - 1.0)))
            if not member.pending:
                self._save()
                if member.bulk_copied:
                    self._drop_copy_cache(member)

    def _yield_to_hosts(self, seconds: float) -> None:
        with self._copy_wanted:  # stop() ends the pause at once
            if not self._stopping:
                self._copy_wanted.wait(seconds)

    def _drop_copy_cache(self, member: Member) -> None:
        """After a bulk copy, write the member back and drop its cached pages.

        Host writes into it then start from small page-cache folios.  A thread
        of its own does it: writing back gigabytes takes seconds, and dropping
        them a tenth of a second, in which the next trigger's copy must not wait.
        """
        member.bulk_copied = False
        with self._drop_lock:
            if self._leaving(member):
                return
            if member.dropper is not None and member.dropper.is_alive():
                return  # still writing back the copy before: the resync does not wait
            member.dropper = threading.Thread(target=self._release, args=(member,),
                                              name=f"drop-cache-{self.name}", daemon=True)
            member.dropper.start()

    def _leaving(self, member: Member) -> bool:
        """The member left the pool, or the volume is stopping or closed."""
        return self._stopping or self._closed or member not in self.members

    def _join_dropper(self, member: Member) -> None:
        """Wait for a cache drop in progress: its store must not close under it.

        The member has left the pool, or the volume is closed: no other drop starts.
        """
        with self._drop_lock:
            dropper, member.dropper = member.dropper, None
        if dropper is not None:
            dropper.join()

    def _release(self, member: Member) -> None:
        try:
            member.store.release()
        except StoreError as exc:
            if self._leaving(member):
                log.warning("could not write back a backup being closed", extra={
                    "lu": self.name, "member": member.idx, "error": str(exc)})
                return
            # the write-back failed: what the member was said to hold may be lost
            self._member_failed(member, exc)

    def resync_progress(self, member: Member) -> dict:
        total = max(member.copy_total, len(member.pending))
        left = len(member.pending)
        elapsed = time.monotonic() - self._copy_started if self._copy_started else 0.0
        rate = self._copied_bytes / elapsed if elapsed > 0 else 0.0
        eta = (left * CHUNK / rate) if rate > 0 and left else 0.0
        return {
            "chunks_total": total,
            "chunks_left": left,
            "percent": 100.0 if total == 0 else round(100.0 * (total - left) / total, 1),
            "rate_bytes_per_s": round(rate),
            "eta_seconds": round(eta, 1),
        }

    def resize(self, size: int) -> None:
        """Grow every copy; the primary has grown already (sequencer lock keeps I/O out)."""
        nchunks = (size + CHUNK - 1) // CHUNK
        with self.seq.lock:
            for member in self.members:
                member.store.resize(size)
                if member.pending_file is not None:
                    member.pending_file.resize(nchunks)
            if self.journal is not None:
                journal = Journal(self.journal.path, size, self.journal.slots, self.journal.sync)
                self.journal.close()
                # a bigger journal starts afresh, still covering the open change set
                journal.restart(self.changes.open | self.changes.since(None))
                self.journal = journal

    def close(self) -> None:
        with self._drop_lock:
            self._closed = True
        for member in self.members:
            self._join_dropper(member)
            member.store.close()
            if member.pending_file is not None:
                member.pending_file.close()
        if self.journal is not None:
            self.journal.close()

    def stop(self) -> None:
        self._stopping = True
        self.wake_resync()
        self._resync.join(10)

    def _save(self) -> None:
        if self._persist is not None:
            self._persist(self)


class GenerationView:
    """A generation, read-only, exact even while its own copy is still running."""

    def __init__(self, volume: MirroredVolume, member: Member) -> None:
        self.volume = volume
        self.member = member

    @property
    def size(self) -> int:
        return self.volume.size

    def _after_earlier(self, offset: int, length: int) -> None:
        """Wait for the mutations ordered before the split that overlap this range."""
        end = offset + length
        for dep in self.member.split_earlier:
            if not dep.finished and dep.start < end and offset < dep.end:
                dep.event.wait()

    def read_into(self, buf: memoryview, offset: int) -> None:
        member = self.member
        self._after_earlier(offset, len(buf))
        if not member.pending:
            member.store.read_into(buf, offset)
            return
        volume = self.volume
        first, stop = chunk_span(offset, len(buf))
        op = volume.seq.admit(first * CHUNK, stop * CHUNK, "generation-read", numbered=False)
        volume.seq.wait(op)
        try:
            pos = offset
            end = offset + len(buf)
            while pos < end:
                c = pos // CHUNK
                stop = min((c + 1) * CHUNK, end)
                source = volume.primary if c in member.pending else member.store
                source.read_into(buf[pos - offset : stop - offset], pos)
                pos = stop
        finally:
            volume.seq.finish(op)

    def extents(self, offset: int, length: int, limit: int | None = None) -> list[Extent]:
        member = self.member
        self._after_earlier(offset, length)
        if member.pending:
            end = min(offset + length, self.size)
            return [Extent(offset, end - offset, AllocationFlag(0))]
        return member.store.extents(offset, length, limit)

    def flush(self) -> None:
        pass

    def cache(self, offset: int, length: int) -> None:
        pass
