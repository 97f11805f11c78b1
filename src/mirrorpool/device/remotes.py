"""Replication links of this device's LUs to remote devices (`mirrorpool remote ...`)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import httpx
from pyroaring import BitMap

from mirrorpool.errors import Conflict, InvalidRequest, NotFound
from mirrorpool.mirror.changes import CHUNK, chunk_span
from mirrorpool.nbd.constants import AllocationFlag
from mirrorpool.replication.journal import ReplicationJournal
from mirrorpool.replication.link import (
    CONSISTENT,
    INCONSISTENT,
    SYNCING,
    RemoteConfig,
    Replicator,
)

if TYPE_CHECKING:
    from mirrorpool.device.device import Device, LogicalUnit

log = logging.getLogger("mirrorpool.replication")

MODES = ("async", "sync")
DEFAULT_JOURNAL_LIMIT = 1 << 30


class RemoteUnreachable(Conflict):
    """The remote device did not answer, or refused."""


def _blob(chunks: BitMap) -> bytes | None:
    return chunks.serialize() if chunks else None


class RemoteService:
    def __init__(self, device: Device) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._replicators: dict[str, Replicator] = {}

    # ------------------------------------------------------------ start-up

    def load(self, divergent: dict[str, BitMap], clean: bool) -> None:
        """Start the links in the catalog; after a crash, refresh what may differ."""
        for (lu_name, device_url, nbd, remote, mode, limit, acked, state,
             dirty) in self.device.catalog.replicas():
            lu = self.device.find_lu(lu_name)
            if lu is None:
                continue
            config = RemoteConfig(lu_name, device_url, nbd, remote, mode, limit,
                                  acked_seq=acked, state=state,
                                  dirty=BitMap.deserialize(dirty) if dirty else BitMap())
            replicator = self._make(lu, config)
            if not clean:
                if state == CONSISTENT and not replicator.journal.stopped:
                    replicator.after_crash(divergent.get(lu_name, BitMap()))
                else:
                    # changes made while the copy was being refreshed are not all on
                    # file: compare everything (zeros go as WRITE_ZEROES)
                    replicator.state = INCONSISTENT
                    replicator.dirty |= BitMap(range((lu.size + CHUNK - 1) // CHUNK))
                    replicator.journal.reset()
                self._save(replicator)
            replicator.start()

    def _journal_dir(self, lu: LogicalUnit) -> str:
        return os.path.join(self.device.data_dir, "lu", f"{lu.record.uuid}.repl")

    def _make(self, lu: LogicalUnit, config: RemoteConfig) -> Replicator:
        journal = ReplicationJournal(self._journal_dir(lu), config.limit)
        replicator = Replicator(config, lu.volume, journal, self._save)
        with self._lock:
            self._replicators[lu.name] = replicator
        return replicator

    def _save(self, r: Replicator) -> None:
        c = r.config
        with r.volume.seq.lock:
            dirty = _blob(r.dirty)
            acked, state = r.acked_seq, r.state
        self.device.catalog.save_replica(c.lu, c.device, c.nbd, c.remote, c.mode, c.limit,
                                         acked, state, dirty)

    @staticmethod
    def _allocated(lu: LogicalUnit) -> BitMap:
        chunks = BitMap()
        for ext in lu.volume.primary.extents(0, lu.volume.size):
            if not ext.flags & AllocationFlag.HOLE:
                first, stop = chunk_span(ext.offset, ext.length)
                chunks.add_range(first, stop)
        return chunks

    # ------------------------------------------------------------ data path

    def replicator(self, lu: str) -> Replicator | None:
        return self._replicators.get(lu)

    def __contains__(self, lu: str) -> bool:
        return lu in self._replicators

    # ------------------------------------------------------------ operations

    def add(self, name: str, device_url: str, remote_name: str | None = None,
            remote_pool: int = 3, mode: str = "async",
            journal_limit: int = DEFAULT_JOURNAL_LIMIT) -> dict:
        lu = self.device.get_lu(name)
        if mode not in MODES:
            raise InvalidRequest(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if journal_limit < 1 << 20:
            raise InvalidRequest("the journal limit must be at least 1 MiB")
        if self.replicator(name) is not None:
            raise Conflict(f"LU {name!r} is already replicated; remove that link first")
        if not urlsplit(device_url).scheme.startswith("http"):
            raise InvalidRequest(f"--device takes the remote device's control API URL, "
                                 f"http://HOST:PORT, not {device_url!r}")
        remote = remote_name or name
        created, nbd = self._prepare_remote(device_url, remote, lu.size, remote_pool)
        config = RemoteConfig(name, device_url.rstrip("/"), nbd, remote, mode, journal_limit,
                              state=SYNCING)
        replicator = self._make(lu, config)
        volume = lu.volume
        with volume.seq.lock:
            # the initial copy: what the primary holds, and whatever is being written now
            if created:
                replicator.dirty |= self._allocated(lu)
            else:
                replicator.dirty |= BitMap(range((lu.size + CHUNK - 1) // CHUNK))
            for op in volume.seq.numbered_inflight():
                if op.end > op.start:
                    replicator.dirty.add_range(op.start // CHUNK, op.end // CHUNK)
        self._save(replicator)
        replicator.start()
        log.info("replication link added", extra={"lu": name, "remote": remote,
                                                   "device": device_url, "mode": mode})
        return replicator.status()

    def _prepare_remote(self, device_url: str, remote: str, size: int,
                        pool: int) -> tuple[bool, str]:
        """Check (or create) the remote LU; returns (created, its NBD URI)."""
        base = device_url.rstrip("/")
        try:
            with httpx.Client(base_url=base, timeout=30) as http:
                status = http.get("/v1/status")
                status.raise_for_status()
                addresses = [a for a in status.json().get("nbd", []) if a.startswith("nbd://")]
                if not addresses:
                    raise RemoteUnreachable(f"the remote device at {base} serves no NBD on TCP")
                got = http.get(f"/v1/lus/{quote(remote, safe='')}")
                created = False
                if got.status_code == 404:
                    made = http.post("/v1/lus", json={"name": remote, "size": size,
                                                      "pool": pool})
                    if made.status_code >= 400:
                        raise RemoteUnreachable(
                            f"the remote device refused to create LU {remote!r}: "
                            f"{made.json().get('detail', made.text)}")
                    created = True
                elif got.status_code >= 400:
                    raise RemoteUnreachable(f"the remote device answered {got.status_code} "
                                            f"for LU {remote!r}")
                else:
                    remote_size = got.json()["size"]
                    if remote_size != size:
                        raise Conflict(f"remote LU {remote!r} is {remote_size} bytes, this LU "
                                       f"{size}: sizes must match")
        except httpx.HTTPError as exc:
            raise RemoteUnreachable(f"cannot reach the remote device at {base}: {exc}") from None
        return created, f"{addresses[0].rstrip('/')}/{quote(remote, safe='')}"

    def remove(self, name: str) -> None:
        lu = self.device.get_lu(name)
        with self._lock:
            replicator = self._replicators.pop(name, None)
        if replicator is None:
            raise NotFound(f"LU {name!r} is not replicated")
        replicator.stop()
        replicator.journal.close()
        self.device.catalog.remove_replica(name)
        shutil.rmtree(self._journal_dir(lu), ignore_errors=True)

    def status(self, name: str) -> dict:
        self.device.get_lu(name)
        replicator = self.replicator(name)
        if replicator is None:
            raise NotFound(f"LU {name!r} is not replicated")
        return replicator.status()

    def all_status(self) -> list[dict]:
        with self._lock:
            replicators = list(self._replicators.values())
        return [r.status() for r in replicators]

    def generations(self, name: str) -> list[dict]:
        """Each trigger's generation here and on the remote device."""
        local = self.device.backups.generations(name)
        replicator = self.replicator(name)
        if replicator is None:
            raise NotFound(f"LU {name!r} is not replicated")
        try:
            with httpx.Client(base_url=replicator.config.device, timeout=30) as http:
                got = http.get(f"/v1/lus/{quote(replicator.config.remote, safe='')}/backups")
                got.raise_for_status()
                remote = got.json()
        except httpx.HTTPError as exc:
            raise RemoteUnreachable(f"cannot reach the remote device: {exc}") from None
        by_id = {g.get("trigger_id"): g for g in remote}
        out = []
        for g in local:
            other = by_id.pop(g.get("trigger_id"), None)
            out.append({"trigger_id": g.get("trigger_id"), "label": g.get("label"),
                        "seq": g.get("seq"), "gen": g["gen"], "state": g.get("state"),
                        "remote_gen": other["gen"] if other else None,
                        "remote_state": other.get("state") if other else None})
        for tid, other in by_id.items():
            out.append({"trigger_id": tid, "label": other.get("label"),
                        "seq": other.get("origin_seq"), "gen": None, "state": None,
                        "remote_gen": other["gen"], "remote_state": other.get("state")})
        return out

    def close(self) -> None:
        with self._lock:
            replicators = list(self._replicators.values())
        for r in replicators:
            r.stop()
            self._save(r)
            r.journal.close()
