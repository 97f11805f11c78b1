"""Using backups: list, pin, diff, restore, and the pool's size and status."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from mirrorpool.device.triggers import generation_info
from mirrorpool.device.volumes import (
    create_member_files,
    lu_files,
    open_member,
    save_volume,
)
from mirrorpool.errors import Conflict, InvalidRequest
from mirrorpool.mirror.changes import CHUNK, byte_extents, chunk_runs
from mirrorpool.replication.journal import Kind

if TYPE_CHECKING:
    from mirrorpool.device.device import Device, LogicalUnit

log = logging.getLogger("mirrorpool.backups")

Progress = Callable[[int, int], None]
RESTORE_RUN = 256  # chunks per restore step (1 MiB)


class BackupService:
    def __init__(self, device: Device) -> None:
        self.device = device

    # ------------------------------------------------------------ listing

    def generations(self, name: str) -> list[dict]:
        lu = self.device.get_lu(name)
        records = {r.gen: r for r in self.device.catalog.generations(name)}
        origins = self.device.catalog.origins(name)
        out = []
        for member in lu.volume.live_generations():
            info = generation_info(name, member, records.get(member.gen or -1))
            if member.gen in origins:
                info["origin_seq"], info["origin_gen"] = origins[member.gen]
            out.append(info)
        return out

    def status(self, lu: LogicalUnit) -> dict:
        volume = lu.volume
        active = volume.active
        members = []
        for m in volume.members:
            entry = {"member": m.idx, "state": m.state.value, "gen": m.gen, "pinned": m.pinned,
                     "readers": m.readers}
            if m.pending or m is active:
                entry["sync"] = volume.resync_progress(m)
            members.append(entry)
        if active is None:
            mirror = "unmirrored" if volume.members else "none"
        else:
            mirror = "syncing" if active.pending else "in-sync"
        return {
            "active_member": active.idx if active else None,
            "active_state": mirror,
            "sync": volume.resync_progress(active) if active else None,
            "generations": len(volume.live_generations()),
            "last_seq": volume.seq.last_seq,
            "last_trigger": volume.last_trigger,
            "members": members,
        }

    # ------------------------------------------------------------ pins

    def pin(self, name: str, gen: int, pinned: bool) -> dict:
        lu = self.device.get_lu(name)
        with lu.volume.seq.lock:
            member = lu.volume.member_of(gen)
            member.pinned = pinned
        self.device.catalog.set_pinned(name, gen, pinned)
        log.info("generation pinned" if pinned else "generation unpinned",
                 extra={"lu": name, "gen": gen})
        return self.generations_by_gen(name)[gen]

    def generations_by_gen(self, name: str) -> dict[int, dict]:
        return {g["gen"]: g for g in self.generations(name)}

    # ------------------------------------------------------------ diff

    def diff(self, name: str, older: int, newer: int | None) -> dict:
        """Extents that differ between two generations (newer None: the primary now)."""
        lu = self.device.get_lu(name)
        volume = lu.volume
        if newer is None:
            chunks = volume.changed_since(older)
        else:
            chunks = volume.changed_between(older, newer)
        extents = [
            {"offset": off, "length": length}
            for off, length, changed in byte_extents(chunks, volume.size, 0, volume.size)
            if changed
        ]
        return {
            "lu": name,
            "from": min(older, newer) if newer is not None else older,
            "to": max(older, newer) if newer is not None else "primary",
            "chunk_size": CHUNK,
            "changed_bytes": sum(e["length"] for e in extents),
            "extents": extents,
        }

    # ------------------------------------------------------------ restore

    def check_restore(self, name: str, gen: int, force: bool) -> LogicalUnit:
        """Refuse a restore before it starts: unknown generation, hosts writing."""
        lu = self.device.get_lu(name)
        lu.volume.member_of(gen)
        if self.device.remotes.source_of(name) is not None:
            raise Conflict(f"LU {name!r} is the remote copy of another device's LU: "
                           "`mirrorpool remote promote` it (with --gen) instead")
        hosts = [s for s in lu.sessions if getattr(s, "writes_primary", False)]
        if hosts and not force:
            raise Conflict(
                f"LU {name!r} has {len(hosts)} connected client(s); a restore under them"
                " would change data they are using: disconnect them or use --force"
            )
        return lu

    def restore(self, name: str, gen: int, force: bool = False,
                progress: Progress | None = None) -> dict:
        """Bring the primary back to generation ``gen``, copying only what differs."""
        lu = self.check_restore(name, gen, force)
        volume = lu.volume
        with volume.seq.lock:
            member = volume.member_of(gen)
            member.readers += 1  # keeps it from being recycled while we copy
            chunks = volume.changes.since(gen)
        try:
            view = volume.generation_view(gen)
            total = len(chunks)
            done = 0
            copied = 0
            buf = bytearray(RESTORE_RUN * CHUNK)
            for first, count in chunk_runs(chunks, RESTORE_RUN):
                offset = first * CHUNK
                length = min(count * CHUNK, volume.size - offset)
                data = memoryview(buf)[:length]
                view.read_into(data, offset)
                # a replicated LU's remote copy gets the restored data in its place
                op = volume.begin(offset, length, self.device.remotes.journal_hook(
                    name, Kind.WRITE, offset, length, data))
                replicator = self.device.remotes.replicator(name)
                if replicator is None:
                    volume.write(op, data, offset)
                else:
                    replicator.carry_out(op, volume.write, op, data, offset)
                done += count
                copied += length
                if progress:
                    progress(done, total)
            volume.flush()
            self.device.remotes.sync_journal(name)
        finally:
            with volume.seq.lock:
                member.readers -= 1
        log.info("restored", extra={"lu": name, "gen": gen, "chunks": total, "bytes": copied})
        return {"lu": name, "gen": gen, "chunks_copied": total, "bytes_copied": copied}

    # ------------------------------------------------------------ pool size

    def set_pool(self, name: str, size: int) -> dict:
        if size < 0 or size > 64:
            raise InvalidRequest(f"pool size {size} is out of range (0 to 64)")
        device = self.device
        lu = device.get_lu(name)
        volume = lu.volume
        with volume.seq.lock:
            current = len(volume.members)
            used = {m.idx for m in volume.members}
        if size > current:
            # files and catalog first, outside the sequencer lock (the catalog is
            # always taken before it, never under it)
            indexes = [i for i in range(size * 2 + 1) if i not in used][: size - current]
            create_member_files(device.data_dir, lu.record, indexes)
            device.catalog.add_members(name, indexes)
            added = []
            for idx in indexes:
                member = open_member(device.data_dir, lu.record, idx)
                device.wrap_member(member)
                added.append(member)
            with volume.seq.lock:
                volume.members.extend(added)
        if size < current:
            # not under the sequencer lock: removal waits for work in flight
            gone = volume.remove_members(current - size)
            device.catalog.remove_members(name, [m.idx for m in gone])
            device.catalog.mark_recycled(name, [m.gen for m in gone if m.gen is not None])
            for path in lu_files(device.data_dir, lu.record.uuid, [m.idx for m in gone])[1:]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        device.catalog.set_pool_size(name, size)
        lu.record = type(lu.record)(**{**lu.record.__dict__, "pool": size})
        save_volume(device.catalog, volume)
        volume.ensure_active()
        log.info("pool resized", extra={"lu": name, "pool": size})
        return self.status(lu)
