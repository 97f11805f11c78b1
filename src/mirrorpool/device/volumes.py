"""Loading a mirrored volume from the catalog, and saving its pool state back."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from pyroaring import BitMap

from mirrorpool.device.catalog import (
    COMPLETED_AT_START_UP,
    Catalog,
    GenerationRecord,
    LuRecord,
    MemberRecord,
)
from mirrorpool.mirror.changes import CHUNK, ChangeLog
from mirrorpool.mirror.journal import BitmapFile, Journal, SplitRecord
from mirrorpool.mirror.pool import Member, MemberState
from mirrorpool.mirror.volume import MirroredVolume, SplitPlan, member_differs
from mirrorpool.store import FileStore


def member_path(data_dir: str, lu_uuid: str, idx: int) -> str:
    return os.path.join(data_dir, "lu", f"{lu_uuid}.m{idx}.img")


def pending_path(data_dir: str, lu_uuid: str, idx: int) -> str:
    return os.path.join(data_dir, "lu", f"{lu_uuid}.m{idx}.pending")


def journal_path(data_dir: str, lu_uuid: str) -> str:
    return os.path.join(data_dir, "lu", f"{lu_uuid}.journal")


def lu_files(data_dir: str, lu_uuid: str, indexes: list[int]) -> list[str]:
    """Every file of an LU but its primary data (which may be an external backing)."""
    files = [journal_path(data_dir, lu_uuid)]
    for idx in indexes:
        files += [member_path(data_dir, lu_uuid, idx), pending_path(data_dir, lu_uuid, idx)]
    return files


def open_member(data_dir: str, record: LuRecord, idx: int) -> Member:
    store = FileStore(member_path(data_dir, record.uuid, idx), record.size)
    nchunks = (record.size + CHUNK - 1) // CHUNK
    return Member(idx, store, pending_file=BitmapFile(pending_path(data_dir, record.uuid, idx),
                                                      nchunks))


def _bitmap(blob: bytes | None) -> BitMap:
    return BitMap.deserialize(blob) if blob else BitMap()


def create_member_files(data_dir: str, record: LuRecord, indexes: list[int]) -> None:
    for idx in indexes:
        FileStore.create(member_path(data_dir, record.uuid, idx), record.size).close()


@dataclass
class Recovery:
    """What start-up found and repaired for one LU."""

    lu: str
    clean: bool
    chunks_to_resync: int = 0
    chunks_marked_changed: int = 0
    generations: int = 0
    generations_completing: int = 0
    splits_completed: int = 0
    divergent: BitMap = field(default_factory=BitMap)  # may differ from what was journalled

    def as_dict(self) -> dict:
        return {
            "lu": self.lu, "clean": self.clean,
            "bytes_to_resync": self.chunks_to_resync * CHUNK,
            "chunks_to_resync": self.chunks_to_resync,
            "chunks_marked_changed": self.chunks_marked_changed,
            "generations": self.generations,
            "generations_completing": self.generations_completing,
            "splits_completed": self.splits_completed,
        }


def open_volume(
    catalog: Catalog, data_dir: str, record: LuRecord, primary: FileStore, clean: bool,
    journal_sync: bool = False,
) -> tuple[MirroredVolume, Recovery]:
    """Rebuild a volume; after a crash, resync what the journal says may differ."""
    nchunks = (record.size + CHUNK - 1) // CHUNK
    inside = BitMap(range(nchunks))
    recovery = Recovery(record.name, clean)
    journal = Journal(journal_path(data_dir, record.uuid), record.size, sync=journal_sync)
    divergent, changed = journal.recover()
    divergent &= inside
    changed &= inside
    if not clean:
        recovery.divergent = divergent
    generations = {g.gen: g for g in catalog.generations(record.name, include_recycled=True)}
    members: list[Member] = []
    for row in catalog.members(record.name):
        member = open_member(data_dir, record, row.idx)
        member.state = MemberState(row.state)
        member.gen = row.gen
        member.last_used = row.last_used
        assert member.pending_file is not None
        member.pending = member.pending_file.load() & inside
        gen = generations.get(row.gen) if row.gen is not None else None
        if member.state is MemberState.GENERATION and gen is not None:
            member.pinned = gen.pinned
            member.frozen_seq = gen.seq
            recovery.generations += 1
            if member.pending:
                recovery.generations_completing += 1
        member.copy_total = len(member.pending)
        members.append(member)
    for split in journal.pending_splits():
        later = any(g > split.gen for g in generations)
        deltas = {g: _bitmap(r.changes) for g, r in generations.items() if r.changes is not None}
        before = ChangeLog(deltas, _bitmap(catalog.lu_state(record.name)[1]) | changed)

        def differs(member: Member, log: ChangeLog = before) -> BitMap:
            return member_differs(member, log, primary, record.size)

        if split.gen not in generations and _complete_split(catalog, record.name, members,
                                                            split, changed, later, differs):
            recovery.splits_completed += 1
            generations = {g.gen: g for g in catalog.generations(record.name,
                                                                 include_recycled=True)}
    for member in members:
        if member.state is MemberState.ACTIVE:
            if divergent and not clean:
                # writes in flight at the crash may have reached one copy and not the other
                member.pending |= divergent
                member.save_pending()
                member.copy_total = len(member.pending)
            recovery.chunks_to_resync = len(member.pending)
    deltas = {g: _bitmap(r.changes) for g, r in generations.items() if r.changes is not None}
    last_seq, open_blob = catalog.lu_state(record.name)
    open_set = _bitmap(open_blob) | changed
    recovery.chunks_marked_changed = len(changed)
    journal.restart(open_set)
    max_gen = max(generations, default=0)
    max_seq = max([last_seq, *(g.seq for g in generations.values())])
    volume = MirroredVolume(
        record.name, primary, members, ChangeLog(deltas, open_set),
        next_seq=max_seq + 1 + (0 if clean else 1_000_000),
        next_gen=max_gen + 1,
        journal=journal,
    )
    return volume, recovery


def _complete_split(
    catalog: Catalog, lu: str, members: list[Member], split: SplitRecord, changed: BitMap,
    later_committed: bool, differs: Callable[[Member], BitMap],
) -> bool:
    """Finish a split the crash cut short: the journal noted it before any write went on.

    Its change set is not known exactly; the chunks the journal saw changed stand
    in for it (an over-report).  Its trigger was never answered, so completing
    it is as good as rolling it back, and keeps every member as it really is.
    If the crash came before the members' pending files were rewritten, no write
    after the split had begun, so what they must copy follows from the change log.
    """
    by_idx = {m.idx: m for m in members}
    frozen = by_idx.get(split.gen_member)
    nxt = by_idx.get(split.next_active) if split.next_active >= 0 else None
    if frozen is None:
        return False
    holder = next((m for m in members if m.state is MemberState.GENERATION
                   and m.gen == split.gen), None)
    if holder is None and later_committed:
        # a later split is in the catalog: the members are as it left them, and the
        # generation of this one was recycled by it (this trigger was never answered)
        return False
    if holder is not None:
        frozen = holder  # member rows were saved after the split: only its record is missing
        nxt = None
    elif not split.applied:
        for m in (frozen, nxt):
            if m is not None and m.state is not MemberState.ACTIVE:
                m.pending |= differs(m)
                m.save_pending()
    for m in members if holder is None else ():
        if m.state is MemberState.ACTIVE and m is not nxt:
            m.state = MemberState.GENERATION if m is frozen else MemberState.FAILED
    frozen.state = MemberState.GENERATION
    frozen.gen = split.gen
    frozen.frozen_seq = split.seq
    frozen.last_used = split.seq
    frozen.pinned = False
    if nxt is not None:
        nxt.state = MemberState.ACTIVE
        nxt.gen = None
        nxt.frozen_seq = None
        nxt.copy_total = len(nxt.pending)
    generation = GenerationRecord(
        split.gen, frozen.idx, split.trigger_id, split.seq, split.label, split.source,
        split.created, False, "ready", changed.serialize(),
    )
    rows = [
        MemberRecord(m.idx, m.state.value, m.gen, m.last_used, None) for m in members
    ]
    with catalog.transaction():
        catalog.save_pool(lu, rows, split.seq, None, [generation], split.recycled)
        catalog.log_trigger(split.trigger_id, [lu], [split.seq], split.source, split.label,
                            split.created, "ok", COMPLETED_AT_START_UP, merge=True)
    return True


def member_rows(volume: MirroredVolume) -> list[MemberRecord]:
    return [
        MemberRecord(m.idx, m.state.value, m.gen, m.last_used,
                     m.pending.serialize() if m.pending else None)
        for m in volume.members
    ]


def save_volume(catalog: Catalog, volume: MirroredVolume) -> None:
    """Save the members as they are now.

    The rows are taken inside the catalog transaction, so no split can commit
    between taking them and committing them (which would put older rows over
    its own); the sequencer lock is held only while taking them.
    """
    with catalog.transaction():
        with volume.seq.lock:
            rows = member_rows(volume)
            last_seq = volume.seq.last_seq
            open_blob = volume.changes.open.serialize()
        catalog.save_pool(volume.name, rows, last_seq, open_blob)


def save_split(
    catalog: Catalog,
    volume: MirroredVolume,
    plan: SplitPlan,
    trigger_id: str,
    label: str,
    source: str,
    created: float,
    recycled: list[int],
) -> None:
    """Record a split in the catalog (inside the caller's transaction, if any).

    Once that is committed, call ``split_committed``.
    """
    with volume.seq.lock:
        rows = member_rows(volume)
        live = [m.gen for m in volume.members if m.state is MemberState.GENERATION]
        oldest = min((g for g in live if g is not None), default=plan.gen)
        volume.changes.prune(oldest - 1)
    assert plan.op is not None and plan.op.seq is not None and plan.delta is not None
    generation = GenerationRecord(
        plan.gen, plan.gen_member.idx, trigger_id, plan.op.seq, label, source, created,
        False, "ready", plan.delta.serialize(),
    )
    catalog.save_pool(
        volume.name, rows, plan.op.seq, None, [generation], recycled,
        prune_changes_upto=oldest - 1,
    )



def split_committed(volume: MirroredVolume, gen: int) -> None:
    """The catalog holds the split's change set: the journal may forget its copy."""
    if volume.journal is not None:
        with volume.seq.lock:
            volume.journal.split_saved(gen)
