"""Loading a mirrored volume from the catalog, and saving its pool state back."""

from __future__ import annotations

import os

from pyroaring import BitMap

from mirrorpool.device.catalog import Catalog, GenerationRecord, LuRecord, MemberRecord
from mirrorpool.mirror.changes import CHUNK, ChangeLog
from mirrorpool.mirror.pool import Member, MemberState
from mirrorpool.mirror.volume import MirroredVolume, SplitPlan
from mirrorpool.store import FileStore


def member_path(data_dir: str, lu_uuid: str, idx: int) -> str:
    return os.path.join(data_dir, "lu", f"{lu_uuid}.m{idx}.img")


def _bitmap(blob: bytes | None) -> BitMap:
    return BitMap.deserialize(blob) if blob else BitMap()


def create_member_files(data_dir: str, record: LuRecord, indexes: list[int]) -> None:
    for idx in indexes:
        FileStore.create(member_path(data_dir, record.uuid, idx), record.size).close()


def open_volume(
    catalog: Catalog, data_dir: str, record: LuRecord, primary: FileStore, clean: bool
) -> MirroredVolume:
    """Rebuild a volume.  After an unclean stop, unknown state is assumed changed."""
    nchunks = (record.size + CHUNK - 1) // CHUNK
    everything = BitMap(range(nchunks))
    generations = {g.gen: g for g in catalog.generations(record.name, include_recycled=True)}
    members: list[Member] = []
    for row in catalog.members(record.name):
        store = FileStore(member_path(data_dir, record.uuid, row.idx), record.size)
        member = Member(row.idx, store, MemberState(row.state), row.gen, row.last_used,
                        _bitmap(row.pending))
        gen = generations.get(row.gen) if row.gen is not None else None
        if member.state is MemberState.GENERATION and gen is not None:
            member.pinned = gen.pinned
            member.frozen_seq = gen.seq
        if not clean:
            if member.state is MemberState.ACTIVE:
                member.pending = BitMap(everything)
            elif member.state is MemberState.GENERATION and member.pending:
                # Its missing chunks were to be copied from a primary that has moved on.
                member.state = MemberState.FAILED
                member.gen = None
        member.copy_total = len(member.pending)
        members.append(member)
    deltas = {g: _bitmap(r.changes) for g, r in generations.items() if r.changes is not None}
    last_seq, open_blob = catalog.lu_state(record.name)
    open_set = _bitmap(open_blob) if clean else BitMap(everything)
    max_gen = max(generations, default=0)
    max_seq = max([last_seq, *(g.seq for g in generations.values())])
    return MirroredVolume(
        record.name, primary, members, ChangeLog(deltas, open_set),
        next_seq=max_seq + 1 + (0 if clean else 1_000_000),
        next_gen=max_gen + 1,
    )


def member_rows(volume: MirroredVolume) -> list[MemberRecord]:
    return [
        MemberRecord(m.idx, m.state.value, m.gen, m.last_used,
                     m.pending.serialize() if m.pending else None)
        for m in volume.members
    ]


def save_volume(catalog: Catalog, volume: MirroredVolume) -> None:
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
    """Make a split durable before the trigger is answered."""
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
