"""The device controller: owns the data directory, the catalog and every LU.

The control API, the CLI (through the API) and the NBD server all act through
this one object, so there is a single code path for every change.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import stat
import threading
import uuid as uuidlib
from dataclasses import dataclass, field

from mirrorpool.device.backups import BackupService
from mirrorpool.device.catalog import Catalog, LuRecord
from mirrorpool.device.remotes import RemoteService
from mirrorpool.device.triggers import TriggerService
from mirrorpool.device.volumes import (
    Recovery,
    create_member_files,
    lu_files,
    open_volume,
    save_volume,
)
from mirrorpool.errors import Conflict, DeviceBusy, Forbidden, InvalidRequest, NotFound
from mirrorpool.mirror.changes import CHUNK
from mirrorpool.mirror.pool import Member
from mirrorpool.mirror.volume import MIN_SHARE, RESYNC_SHARE, MirroredVolume
from mirrorpool.store import FileStore, StoreError
from mirrorpool.store.fault import FaultStore
from mirrorpool.store.file import device_size

log = logging.getLogger("mirrorpool.device")

# '@' and ':' are kept for export names such as NAME@GEN and NAME:trigger.
LU_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SECTOR = 512


class Session:
    """What the device needs of a host connection: a way to end it."""

    peer: str
    finished: threading.Event
    writes_primary: bool

    def disconnect(self) -> None: ...


@dataclass(eq=False)
class LogicalUnit:
    record: LuRecord
    store: FileStore
    volume: MirroredVolume
    sessions: set[Session] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def size(self) -> int:
        return self.store.size

    @property
    def data_path(self) -> str:
        return self.store.path


class Device:
    def __init__(self, data_dir: str, journal_sync: bool = False,
                 fault_injection: bool = False, resync_share: float = RESYNC_SHARE) -> None:
        if not MIN_SHARE <= resync_share <= 1.0:
            raise InvalidRequest(f"the resync share must be from {MIN_SHARE} to 1, "
                                 f"not {resync_share}")
        self.resync_share = resync_share
        self.journal_sync = journal_sync
        self.fault_injection = fault_injection
        self.recovery: list[Recovery] = []
        self.data_dir = os.path.abspath(data_dir)
        os.makedirs(os.path.join(self.data_dir, "lu"), exist_ok=True)
        self._lock_fd = _lock_data_dir(self.data_dir)
        self.catalog = Catalog(os.path.join(self.data_dir, "catalog.sqlite"))
        self._lock = threading.RLock()
        self._lus: dict[str, LogicalUnit] = {}
        self.triggers = TriggerService(self)
        self.backups = BackupService(self)
        self.remotes = RemoteService(self)
        self.clean_start = self.catalog.get_meta("clean") != "0"
        # names this device to the devices it replicates to, and to those replicating here
        self.device_id = self.catalog.get_meta("device_id") or str(uuidlib.uuid4())
        self.catalog.set_meta("device_id", self.device_id)
        for record in self.catalog.lus():
            store = self._open_store(record)
            volume, recovery = open_volume(self.catalog, self.data_dir, record, store,
                                           self.clean_start, journal_sync)
            self.recovery.append(recovery)
            self._attach_volume(volume)
            self._lus[record.name] = LogicalUnit(record, store, volume)
        self.remotes.load({r.lu: r.divergent for r in self.recovery}, self.clean_start)
        self.catalog.set_meta("clean", "0")
        if not self.clean_start:
            for r in self.recovery:
                log.warning("recovered after an unclean stop", extra=r.as_dict())
            log.warning("device was not stopped cleanly: recovery summary", extra={
                "lus": len(self.recovery),
                "bytes_to_resync": sum(r.chunks_to_resync for r in self.recovery) * CHUNK,
                "generations": sum(r.generations for r in self.recovery),
                "generations_completing": sum(r.generations_completing for r in self.recovery),
            })
        log.info("device opened", extra={"data_dir": self.data_dir, "lus": len(self._lus)})

    def _attach_volume(self, volume: MirroredVolume) -> None:
        volume.resync_share = self.resync_share
        volume._persist = lambda v: save_volume(self.catalog, v)
        volume.on_generation_lost = lambda gen: self.catalog.mark_generation(
            volume.name, gen, "failed")
        if self.fault_injection:
            volume.primary = FaultStore(volume.primary)  # type: ignore[assignment]
            for member in volume.members:
                self.wrap_member(member)
        volume.ensure_active()
        volume.wake_resync()

    # ---------------------------------------------------------------- LUs

    def list_lus(self) -> list[LogicalUnit]:
        with self._lock:
            return [self._lus[name] for name in sorted(self._lus)]

    def get_lu(self, name: str) -> LogicalUnit:
        with self._lock:
            lu = self._lus.get(name)
        if lu is None:
            raise NotFound(f"no LU named {name!r}")
        return lu

    def find_lu(self, name: str) -> LogicalUnit | None:
        with self._lock:
            return self._lus.get(name)

    def create_lu(
        self, name: str, size: int | None, pool: int = 3, backing: str | None = None
    ) -> LogicalUnit:
        if not LU_NAME_RE.fullmatch(name):
            raise InvalidRequest(
                f"{name!r} is not a valid LU name: use 1 to 64 letters, digits, '.', '_' or '-',"
                " starting with a letter or digit"
            )
        if pool < 0 or pool > 64:
            raise InvalidRequest(f"pool size {pool} is out of range (0 to 64)")
        if backing is not None:
            size = self._check_backing(backing, size)
        if size is None:
            raise InvalidRequest("a size is needed (for example --size 64M)")
        _check_size(size)
        with self._lock:
            if name in self._lus:
                raise Conflict(f"an LU named {name!r} already exists")
            if backing is not None and any(
                lu.record.backing == backing for lu in self._lus.values()
            ):
                raise Conflict(f"{backing} already backs another LU")
            lu_uuid = str(uuidlib.uuid4())
            path = backing or self._internal_path(lu_uuid)
            indexes = list(range(pool))
            try:
                if backing is None:
                    store = FileStore.create(path, size)
                else:
                    store = FileStore(path, None)
                    store.resize(size)
            except (OSError, StoreError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise InvalidRequest(f"cannot create the data file {path}: {why}") from exc
            try:
                record = self.catalog.add_lu(name, lu_uuid, size, pool, backing)
                create_member_files(self.data_dir, record, indexes)
                self.catalog.add_members(name, indexes)
            except Exception:
                store.close()
                self.catalog.remove_lu(name)
                for path in lu_files(self.data_dir, lu_uuid, indexes):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                if backing is None:
                    os.unlink(path)
                raise
            volume, _ = open_volume(self.catalog, self.data_dir, record, store, True,
                                    self.journal_sync)
            self._attach_volume(volume)
            lu = LogicalUnit(record, store, volume)
            self._lus[name] = lu
        log.info("LU created", extra={"lu": name, "size": size, "pool": pool})
        return lu

    def delete_lu(self, name: str, force: bool = False) -> None:
        with self._lock:
            lu = self.get_lu(name)
            if lu.sessions and not force:
                raise Conflict(
                    f"LU {name!r} has {len(lu.sessions)} connected client(s);"
                    " disconnect them or use --force"
                )
            if self.remotes.replicator(name) is not None:
                self.remotes.remove(name)
            del self._lus[name]
            self.catalog.remove_lu(name)
        for session in list(lu.sessions):
            session.disconnect()
        for session in list(lu.sessions):
            # requests in flight must be done before their descriptors close
            session.finished.wait(10)
        lu.volume.stop()
        lu.volume.close()
        for path in lu_files(self.data_dir, lu.record.uuid, [m.idx for m in lu.volume.members]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        lu.store.close()
        if lu.record.backing is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lu.data_path)
        log.info("LU deleted", extra={"lu": name, "forced": force})

    def resize_lu(self, name: str, size: int) -> LogicalUnit:
        with self._lock:
            lu = self.get_lu(name)
            if size < lu.size:
                raise InvalidRequest(
                    f"LU {name!r} is {lu.size} bytes; shrinking to {size} would lose data"
                    " (only growing is supported)"
                )
            if self.remotes.replicator(name) is not None:
                raise Conflict(f"LU {name!r} is replicated: remove the link, grow both LUs,"
                               " then add the link again")
            _check_size(size)
            try:
                lu.store.resize(size)
                lu.volume.resize(size)
            except StoreError as exc:
                raise InvalidRequest(f"cannot grow LU {name!r}: {exc}") from exc
            except OSError as exc:
                raise InvalidRequest(f"cannot grow LU {name!r}: {exc.strerror}") from exc
            self.catalog.set_lu_size(name, size)
            lu.record = LuRecord(**{**lu.record.__dict__, "size": size})
        log.info("LU resized", extra={"lu": name, "size": size})
        return lu

    def wrap_member(self, member: Member) -> None:
        if self.fault_injection and not isinstance(member.store, FaultStore):
            member.store = FaultStore(member.store)  # type: ignore[assignment]

    def fault_store(self, name: str, target: str) -> FaultStore:
        """The fault layer of an LU's primary, a member ("member:N") or the active backup."""
        if not self.fault_injection:
            raise Forbidden("fault injection is off: start the device with --fault-injection")
        volume = self.get_lu(name).volume
        if target == "primary":
            store = volume.primary
        elif target == "active":
            if volume.active is None:
                raise Conflict(f"LU {name!r} has no active backup")
            store = volume.active.store
        elif target.startswith("member:") and target[7:].isdigit():
            idx = int(target[7:])
            found = [m for m in volume.members if m.idx == idx]
            if not found:
                raise NotFound(f"LU {name!r} has no pool member {idx}")
            store = found[0].store
        else:
            raise InvalidRequest("target must be 'primary', 'active' or 'member:N'")
        assert isinstance(store, FaultStore)
        return store

    # ---------------------------------------------------------------- sessions

    def attach(self, lu: LogicalUnit, session: Session) -> None:
        with self._lock:
            if self._lus.get(lu.name) is not lu:
                raise NotFound(f"no LU named {lu.name!r}")
            lu.sessions.add(session)

    def detach(self, lu: LogicalUnit, session: Session) -> None:
        with self._lock:
            lu.sessions.discard(session)

    # ---------------------------------------------------------------- lifetime

    def flush_all(self) -> None:
        for lu in self.list_lus():
            try:
                lu.store.flush()
            except StoreError as exc:
                log.error("flush failed", extra={"lu": lu.name, "error": str(exc)})

    def close(self) -> None:
        self.remotes.close()
        with self._lock:
            lus = list(self._lus.values())
        for lu in lus:
            lu.volume.stop()
            lu.volume.flush()
            for member in lu.volume.members:
                member.store.flush()
            save_volume(self.catalog, lu.volume)
        for lu in lus:
            lu.volume.close()
            lu.store.close()
        with self._lock:
            self._lus.clear()
        self.catalog.set_meta("clean", "1")
        self.catalog.close()
        os.close(self._lock_fd)

    # ---------------------------------------------------------------- helpers

    def _internal_path(self, lu_uuid: str) -> str:
        return os.path.join(self.data_dir, "lu", f"{lu_uuid}.img")

    def _open_store(self, record: LuRecord) -> FileStore:
        path = record.backing or self._internal_path(record.uuid)
        return FileStore(path, record.size)

    @staticmethod
    def _check_backing(backing: str, size: int | None) -> int:
        if "\0" in backing:
            raise InvalidRequest("--backing contains a NUL character")
        if not os.path.isabs(backing):
            raise InvalidRequest(f"--backing needs an absolute path, not {backing!r}")
        try:
            st = os.stat(backing)
        except OSError as exc:
            raise InvalidRequest(f"cannot use {backing} as backing: {exc.strerror}") from exc
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise InvalidRequest(f"{backing} is neither a regular file nor a block device")
        actual = device_size(backing)
        if size is None:
            if actual == 0:
                raise InvalidRequest(f"{backing} is empty: give --size to grow it")
            return actual - actual % SECTOR
        if stat.S_ISBLK(st.st_mode) and size > actual:
            raise InvalidRequest(f"{backing} holds {actual} bytes, less than {size}")
        return size


# Far above any real LU, and within what the kernel's off_t and file systems accept.
MAX_LU_SIZE = 1 << 50


def _check_size(size: int) -> None:
    if size <= 0 or size % SECTOR:
        raise InvalidRequest(f"size {size} must be a positive multiple of {SECTOR} bytes")
    if size > MAX_LU_SIZE:
        raise InvalidRequest(f"size {size} is over the limit of {MAX_LU_SIZE} bytes (1P)")


def _lock_data_dir(data_dir: str) -> int:
    path = os.path.join(data_dir, "device.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DeviceBusy(
            f"data directory {data_dir} is in use by a running device (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
