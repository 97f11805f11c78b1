"""Replication links of this device's LUs to remote devices (`mirrorpool remote ...`)."""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import httpx
from pyroaring import BitMap

from mirrorpool.device.exports import link_sessions
from mirrorpool.errors import Conflict, InvalidRequest, MirrorpoolError, NotFound
from mirrorpool.mirror.changes import CHUNK, chunk_runs, chunk_span
from mirrorpool.nbd.client import NbdClient, NbdError
from mirrorpool.nbd.constants import AllocationFlag
from mirrorpool.nbd.tls import TlsSetupError, client_tls_context
from mirrorpool.replication.checksums import MAX_RANGE, chunk_digests, differing
from mirrorpool.replication.journal import Kind, ReplicationJournal
from mirrorpool.replication.link import (
    CONSISTENT,
    INCONSISTENT,
    REPLAYING,
    REVERSING,
    SYNCING,
    LinkOptions,
    RemoteConfig,
    Replicator,
)

if TYPE_CHECKING:
    from mirrorpool.device.device import Device, LogicalUnit

log = logging.getLogger("mirrorpool.replication")
Progress = Callable[[int, int], None]

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
        self._resyncing: set[str] = set()  # LUs being brought back in line from their copy
        self._applied: dict[str, tuple[int, int]] = {}  # copy -> (requests, bytes) this run

    # ------------------------------------------------------------ start-up

    def load(self, divergent: dict[str, BitMap], clean: bool) -> None:
        """Start the links in the catalog; after a crash, refresh what may differ."""
        for (lu_name, device_url, nbd, remote, mode, limit, acked, state,
             dirty, options) in self.device.catalog.replicas():
            lu = self.device.find_lu(lu_name)
            if lu is None:
                continue
            config = RemoteConfig(lu_name, device_url, nbd, remote, mode, limit,
                                  acked_seq=acked, state=state,
                                  dirty=BitMap.deserialize(dirty) if dirty else BitMap(),
                                  options=LinkOptions.from_json(options))
            try:
                replicator = self._make(lu, config)
            except MirrorpoolError as exc:  # e.g. a TLS file gone: the others still start
                log.error("replication link not started", extra={"lu": lu_name,
                                                                  "why": str(exc)})
                continue
            # After a crash the volume numbers from its last saved point plus a margin;
            # a journal or a remote copy ahead of that must never see numbers again.
            lu.volume.seq.skip_past(max(replicator.journal.last_seq, acked))
            if state == REVERSING:
                replicator.last_error = ("a reverse resync did not finish: run `mirrorpool "
                                         f"remote resync {lu_name} --reverse` again")
                continue  # not started: it would overwrite what hosts wrote on the copy
            if not clean:
                journal = replicator.journal
                if state in (CONSISTENT, REPLAYING) and not journal.stopped and not journal.hole:
                    replicator.after_crash(divergent.get(lu_name, BitMap()))
                else:
                    # changes made while the copy was being refreshed are not all on
                    # file: compare every chunk with the remote copy
                    replicator.state = INCONSISTENT
                    replicator.journal.reset()
                    replicator.compare_all()
                self._save(replicator)
            else:
                replicator.journal_unsent_on_start()
            replicator.start()

    def _journal_dir(self, lu: LogicalUnit) -> str:
        return os.path.join(self.device.data_dir, "lu", f"{lu.record.uuid}.repl")

    def _make(self, lu: LogicalUnit, config: RemoteConfig,
              journal: ReplicationJournal | None = None) -> Replicator:
        journal = journal or ReplicationJournal(self._journal_dir(lu), config.limit)
        replicator = Replicator(config, lu.volume, journal, self._save,
                                remote_digests=self._digest_fetcher(config),
                                tls=self._tls_context(config.options),
                                trigger_committed=self.device.catalog.trigger_answered)
        with self._lock:
            self._replicators[lu.name] = replicator
        return replicator

    @staticmethod
    def _tls_context(options: LinkOptions) -> ssl.SSLContext | None:
        if not options.tls:
            return None
        try:
            return client_tls_context(options.tls_ca, options.tls_cert, options.tls_key)
        except TlsSetupError as exc:
            raise InvalidRequest(str(exc)) from None

    @staticmethod
    def _digest_fetcher(config: RemoteConfig) -> Callable[[int, int], bytes]:
        def fetch(offset: int, length: int) -> bytes:
            path = f"/v1/lus/{quote(config.remote, safe='')}/checksums"
            try:
                got = httpx.get(config.device + path, params={"offset": offset,
                                                              "length": length}, timeout=120)
            except httpx.HTTPError as exc:
                raise NbdError(f"cannot fetch checksums from the remote device: {exc}") from None
            if got.status_code != 200:
                raise NbdError(f"the remote device refused checksums: {got.text}")
            return got.content

        return fetch

    def _save(self, r: Replicator) -> None:
        c = r.config
        with r.volume.seq.lock:
            # chunks still to compare are saved as to copy: a restart copies them
            dirty = _blob(r.dirty | r.compare)
            acked, state = r.acked_seq, r.state
        self.device.catalog.save_replica(c.lu, c.device, c.nbd, c.remote, c.mode, c.limit,
                                         acked, state, dirty, c.options.to_json())

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
            journal_limit: int = DEFAULT_JOURNAL_LIMIT,
            options: LinkOptions | None = None) -> dict:
        lu = self.device.get_lu(name)
        options = options or LinkOptions()
        if mode not in MODES:
            raise InvalidRequest(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if journal_limit < 1 << 20:
            raise InvalidRequest("the journal limit must be at least 1 MiB")
        if self.replicator(name) is not None:
            raise Conflict(f"LU {name!r} is already replicated; remove that link first")
        if self.source_of(name) is not None:
            raise Conflict(f"LU {name!r} is itself a remote copy; promote it before "
                           "replicating it")
        if not urlsplit(device_url).scheme.startswith("http"):
            raise InvalidRequest(f"--device takes the remote device's control API URL, "
                                 f"http://HOST:PORT, not {device_url!r}")
        for what in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(options, what)
            if path is not None and not os.access(path, os.R_OK):
                raise InvalidRequest(f"--{what.replace('_', '-')} {path}: no readable file")
        if bool(options.tls_cert) != bool(options.tls_key):
            raise InvalidRequest("--tls-cert and --tls-key go together")
        tls = self._tls_context(options)  # refuses unusable certificates before anything
        remote = remote_name or name
        created, claimed, nbd = self._prepare_remote(device_url, remote, lu, remote_pool,
                                                     options)
        config = RemoteConfig(name, device_url.rstrip("/"), nbd, remote, mode, journal_limit,
                              state=SYNCING, options=options)
        try:
            self._check_link(config, tls, lu.size)
        except MirrorpoolError:
            if created or claimed:
                self._undo_prepare(config, lu, created)
            raise
        replicator = self._make(lu, config)
        volume = lu.volume
        with volume.seq.lock:
            # the initial copy: what the primary holds, and whatever is being written now
            if created:
                replicator.dirty |= self._allocated(lu)
            else:
                replicator.compare |= BitMap(range((lu.size + CHUNK - 1) // CHUNK))
            for op in volume.seq.numbered_inflight():
                if op.end > op.start:
                    replicator.dirty.add_range(op.start // CHUNK, op.end // CHUNK)
            replicator.compare -= replicator.dirty
        self._save(replicator)
        replicator.start()
        log.info("replication link added", extra={"lu": name, "remote": remote,
                                                   "device": device_url, "mode": mode,
                                                   "tls": options.tls})
        return replicator.status()

    @staticmethod
    def _check_link(config: RemoteConfig, tls: ssl.SSLContext | None, size: int) -> None:
        """Open the link once now, so a refusal is the answer to `remote add`."""
        try:
            client = NbdClient(config.nbd, timeout=config.options.link_timeout, tls=tls)
        except (OSError, NbdError) as exc:
            raise RemoteUnreachable(f"the remote device refused the replication link "
                                    f"({config.nbd}): {exc}") from None
        try:
            if client.size != size:
                raise Conflict(f"the remote LU is {client.size} bytes over NBD, this LU {size}")
        finally:
            client.close()

    def _prepare_remote(self, device_url: str, remote: str, lu: LogicalUnit, pool: int | None,
                        options: LinkOptions) -> tuple[bool, bool, str]:
        """Check (or create) the remote LU and claim it as this LU's copy.

        Returns (created, claimed now, the link's NBD URI); ``pool`` None: it must exist.
        """
        base = device_url.rstrip("/")
        size = lu.size
        try:
            with httpx.Client(base_url=base, timeout=30) as http:
                status = http.get("/v1/status")
                status.raise_for_status()
                if status.json().get("device_id") == self.device.device_id:
                    raise InvalidRequest(f"{base} is this device: replicate to another one")
                addresses = [a for a in status.json().get("nbd", [])
                             if a.startswith(("nbd://", "nbds://"))]
                if options.nbd_address:
                    addresses = [f"nbd://{options.nbd_address}"]
                if not addresses:
                    raise RemoteUnreachable(f"the remote device at {base} serves no NBD on TCP")
                got = http.get(f"/v1/lus/{quote(remote, safe='')}")
                created = False
                if got.status_code == 404 and pool is None:
                    raise NotFound(f"the remote device has no LU {remote!r}")
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
                before = http.get(f"/v1/lus/{quote(remote, safe='')}/replica-of")
                claimed = before.status_code != 200
                claim = http.put(f"/v1/lus/{quote(remote, safe='')}/replica-of", json={
                    "source_device": self.device.device_id, "source_lu": lu.name,
                    "source_uuid": lu.record.uuid})
                if claim.status_code >= 400:
                    raise Conflict(f"the remote device refused: "
                                   f"{claim.json().get('detail', claim.text)}")
        except httpx.HTTPError as exc:
            raise RemoteUnreachable(f"cannot reach the remote device at {base}: {exc}") from None
        host_port = addresses[0].split("://", 1)[1].split("/", 1)[0]
        scheme = "nbds" if options.tls else "nbd"
        export = quote(f"{remote}:replica:{lu.record.uuid}", safe=":")
        return created, claimed, f"{scheme}://{host_port}/{export}"

    def _undo_prepare(self, config: RemoteConfig, lu: LogicalUnit, created: bool) -> None:
        """A refused link leaves the remote device as it was: no new LU, no claim."""
        path = f"/v1/lus/{quote(config.remote, safe='')}"
        try:
            with httpx.Client(base_url=config.device, timeout=30) as http:
                if created:
                    http.delete(path, params={"force": "true"})
                else:
                    http.delete(f"{path}/replica-of", params={"source_uuid": lu.record.uuid})
        except httpx.HTTPError as exc:
            log.warning("could not undo the remote side of a refused link",
                        extra={"lu": lu.name, "error": str(exc)})

    # ------------------------------------------------------------ the remote side

    def source_of(self, lu: str) -> tuple[str, str, str, float] | None:
        """(source device, source LU, source uuid, since) if LU is another LU's copy."""
        return self.device.catalog.replica_of(lu)

    def accept_source(self, name: str, source_device: str, source_lu: str,
                      source_uuid: str) -> dict:
        """Make LU ``name`` the remote copy of a source LU: its link is its one writer."""
        lu = self.device.get_lu(name)
        if source_device == self.device.device_id:
            raise InvalidRequest("a device cannot replicate to itself")
        current = self.source_of(name)
        if current is not None and (current[0], current[2]) != (source_device, source_uuid):
            raise Conflict(f"LU {name!r} is already the copy of LU {current[1]!r} on device "
                           f"{current[0]}: promote or delete it here first, or choose "
                           "another --remote-name")
        if self.replicator(name) is not None:
            raise Conflict(f"LU {name!r} is replicated from here to another device: it cannot "
                           "also be a copy")
        writers = [s for s in lu.sessions if getattr(s, "writes_primary", False)]
        if current is None and writers:
            raise Conflict(f"LU {name!r} has {len(writers)} host connection(s) that may write: "
                           "a remote copy takes writes from its link only; disconnect them")
        self.device.catalog.set_replica_of(name, source_device, source_lu, source_uuid)
        log.info("LU is now a remote copy", extra={"lu": name, "source_lu": source_lu,
                                                    "source_device": source_device})
        return self.copy_status(name)

    def release_source(self, name: str, source_uuid: str) -> None:
        """Forget that LU is the copy of the source LU ``source_uuid`` (a refused link)."""
        self.device.get_lu(name)
        source = self.source_of(name)
        if source is None or source[2] != source_uuid:
            raise NotFound(f"LU {name!r} is not the copy of LU {source_uuid}")
        self.device.catalog.clear_replica_of(name)

    def copy_status(self, name: str) -> dict:
        """The copy's side of a link: its source, whether the link is up, what it applied."""
        lu = self.device.get_lu(name)
        source = self.source_of(name)
        if source is None:
            raise NotFound(f"LU {name!r} is not a remote copy of another device's LU")
        links = link_sessions(lu)
        last = None
        for t in self.device.catalog.triggers(name, 50):
            if t["source"] == "link" and t["outcome"] == "ok":
                gen = next((g for g in self.device.backups.generations(name)
                            if g.get("trigger_id") == t["id"]), {})
                last = {"trigger_id": t["id"], "label": t["label"], "at": t["received"],
                        "gen": gen.get("gen"), "origin_seq": gen.get("origin_seq")}
                break
        applied = self._applied.get(name, (0, 0))
        return {"lu": name, "role": "copy", "source_device": source[0],
                "source_lu": source[1], "source_uuid": source[2], "since": source[3],
                "connected": bool(links), "applied_requests": applied[0],
                "applied_bytes": applied[1], "last_remote_trigger": last}

    def note_applied(self, name: str, nbytes: int) -> None:
        """A mutation came in over the link (counted for the copy's status)."""
        count, total = self._applied.get(name, (0, 0))
        self._applied[name] = (count + 1, total + nbytes)

    def promote(self, name: str, gen: int | None = None) -> dict:
        """Make a remote copy (or one of its generations) a primary hosts can write."""
        lu = self.device.get_lu(name)
        source = self.source_of(name)
        if source is None:
            raise Conflict(f"LU {name!r} is not a remote copy: it is a primary already")
        if gen is not None:
            lu.volume.member_of(gen)  # refuses an unknown generation before anything
        self.device.catalog.clear_replica_of(name)
        for session in link_sessions(lu):
            session.disconnect()  # the link: its next write would be refused anyway
        restored = None
        if gen is not None:
            try:
                restored = self.device.backups.restore(name, gen, force=True)
            except BaseException:
                # not promoted after all: the copy stays the source's, as it was
                self.device.catalog.set_replica_of(name, *source[:3])
                raise
        log.warning("remote copy promoted to primary",
                    extra={"lu": name, "source_lu": source[1], "gen": gen})
        return {"lu": name, "promoted": True, "source_lu": source[1],
                "source_device": source[0], "restored": restored}

    def checksums(self, name: str, offset: int, length: int) -> bytes:
        lu = self.device.get_lu(name)
        if offset < 0 or length <= 0 or offset % CHUNK or offset >= lu.size:
            raise InvalidRequest(f"offset must be a multiple of {CHUNK} inside the LU, and "
                                 "length positive")
        if length > MAX_RANGE:
            raise InvalidRequest(f"length is at most {MAX_RANGE} bytes per request")
        return chunk_digests(lu.volume.primary.read_into, lu.size, offset,
                             min(length, lu.size - offset))

    # ------------------------------------------------------------ resync

    def resync(self, name: str, reverse: bool = False, force: bool = False,
               progress: Progress | None = None) -> dict:
        """Compare the two copies chunk by chunk and copy only what differs.

        Forward: the remote copy is refreshed from here.  Reverse (after the
        remote copy was promoted and written there): this LU is brought in line
        with it, the remote LU becomes a copy again, and the link goes on from here.
        """
        lu = self.device.get_lu(name)
        replicator = self.replicator(name)
        if replicator is None:
            raise NotFound(f"LU {name!r} is not replicated")
        if not reverse:
            if replicator.state == REVERSING:
                raise Conflict(f"a reverse resync of LU {name!r} did not finish: run it again "
                               "with --reverse")
            replicator.compare_all()
            return replicator.status()
        return self._reverse(lu, replicator, force, progress)

    def check_reverse(self, name: str, force: bool) -> None:
        lu = self.device.get_lu(name)
        if self.replicator(name) is None:
            raise NotFound(f"LU {name!r} is not replicated")
        hosts = [s for s in lu.sessions if getattr(s, "writes_primary", False)]
        if hosts and not force:
            raise Conflict(f"LU {name!r} has {len(hosts)} connected client(s); a reverse "
                           "resync changes data under them: disconnect them or use --force")

    @staticmethod
    def _check_promoted(config: RemoteConfig) -> None:
        """A reverse resync takes the remote LU's data: only once it was promoted there."""
        path = f"/v1/lus/{quote(config.remote, safe='')}/replica-of"
        try:
            got = httpx.get(config.device + path, timeout=30)
        except httpx.HTTPError as exc:
            raise RemoteUnreachable(f"cannot reach the remote device: {exc}") from None
        if got.status_code == 200:
            raise Conflict(f"the remote LU {config.remote!r} is still this LU's copy (it was "
                           "not promoted): there is nothing to bring back from it; "
                           "`mirrorpool remote resync` without --reverse compares the "
                           "other way")

    def writes_refused(self, name: str) -> bool:
        return name in self._resyncing

    def _reverse(self, lu: LogicalUnit, old: Replicator, force: bool,
                 progress: Progress | None) -> dict:
        self.check_reverse(lu.name, force)
        config = old.config
        with self._lock:
            if lu.name in self._resyncing:
                raise Conflict(f"LU {lu.name!r} is already being resynchronised")
            self._resyncing.add(lu.name)
        try:
            if old.state != REVERSING:
                self._check_promoted(config)
            old.stop()
            with lu.volume.seq.lock:
                old.state = REVERSING
            self._save(old)  # a crash from here on leaves the link stopped
            # the remote LU becomes this LU's copy again: its hosts must be gone
            self._prepare_remote(config.device, config.remote, lu, None, config.options)
            fetch = self._digest_fetcher(config)
            tls = self._tls_context(config.options)
            volume = lu.volume
            total = (lu.size + CHUNK - 1) // CHUNK
            copied = 0
            step = MAX_RANGE // 16  # 16 MiB compared per step
            with NbdClient(config.nbd, timeout=config.options.link_timeout, tls=tls) as client:
                for offset in range(0, lu.size, step):
                    length = min(step, lu.size - offset)
                    theirs = fetch(offset, length)
                    mine = chunk_digests(volume.primary.read_into, lu.size, offset, length)
                    differ = differing(offset // CHUNK, mine, theirs)
                    for first, count in chunk_runs(differ, 256):
                        start = first * CHUNK
                        data = client.pread(min((first + count) * CHUNK, lu.size) - start, start)
                        op = volume.begin(start, len(data))
                        volume.write(op, memoryview(data), start)
                        copied += len(data)
                    if progress:
                        progress(min(total, (offset + length) // CHUNK), total)
            volume.flush()
            # both copies are equal: journal from this point on
            journal = old.journal
            with volume.seq.lock:
                journal.reset()
                config.state = CONSISTENT
                config.acked_seq = volume.seq.last_seq
                config.dirty = BitMap()
                replicator = self._make(lu, config, journal)
            self._save(replicator)
            replicator.start()
        except BaseException as exc:
            if old.state != REVERSING:
                raise  # refused before anything changed: the link goes on as it was
            # The link stays stopped: restarted, it would refresh the remote LU from
            # here and undo what hosts wrote there.  Running this again finishes it.
            old.last_error = (f"reverse resync failed ({exc}): run `mirrorpool remote resync "
                              f"{lu.name} --reverse` again")
            raise
        finally:
            with self._lock:
                self._resyncing.discard(lu.name)
        log.info("reverse resync done", extra={"lu": lu.name, "bytes_copied": copied})
        return {"lu": lu.name, "reverse": True, "bytes_compared": lu.size,
                "bytes_copied": copied, "state": CONSISTENT}

    def sync_journal(self, name: str) -> None:
        """A host's FLUSH: the replication journal is as durable as the data it covers."""
        replicator = self.replicator(name)
        if replicator is not None:
            replicator.sync_journal()

    # ------------------------------------------------------------ writes of the device itself

    def journal_hook(self, name: str, kind: Kind, offset: int, length: int,
                     data: bytes | memoryview = b"") -> Callable[[int], None] | None:
        """For a mutation this device makes itself (a restore): keep the remote copy exact."""
        replicator = self.replicator(name)
        if replicator is None:
            return None
        return lambda seq: replicator.on_mutation(kind, seq, offset, length, data)

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
        """A link's state: the source's view, or on the remote device the copy's."""
        self.device.get_lu(name)
        replicator = self.replicator(name)
        if replicator is not None:
            return {"role": "source", **replicator.status()}
        if self.source_of(name) is not None:
            return self.copy_status(name)
        raise NotFound(f"LU {name!r} is not replicated")

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
