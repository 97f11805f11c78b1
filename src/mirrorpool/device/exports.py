"""Export names hosts can open, and what stands behind each.

    NAME           the primary LU, read-write (read-only while it is the remote copy
                   of another device's LU)
    NAME:replica:UUID  the replication link from the source LU with that uuid
    NAME@GEN       generation GEN of NAME, read-only
    NAME:trigger   special path: every WRITE is a trigger for NAME (payload: label)
    .trigger       trigger LU: a WRITE of a trigger record splits the LUs it names

Every export answers the same small set of calls from the NBD server.
``admit`` runs where the server has received the request whole and in order,
so it is where mutations and triggers get their sequence numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from mirrorpool.device.triggers import PendingTrigger, check_label
from mirrorpool.errors import InvalidRequest, MirrorpoolError, NotFound
from mirrorpool.mirror.changes import byte_extents
from mirrorpool.mirror.volume import GenerationView
from mirrorpool.nbd.constants import (
    BASE_ALLOCATION,
    TRIGGER_CONTEXT,
    AllocationFlag,
    Cmd,
    CmdFlag,
    Errno,
)
from mirrorpool.replication.journal import Kind
from mirrorpool.replication.link import CONSISTENT, parse_forwarded
from mirrorpool.store import Extent, StoreError

if TYPE_CHECKING:
    from mirrorpool.device.device import Device, LogicalUnit
    from mirrorpool.nbd.codec import Command

# A metadata context turns a range into runs for BLOCK_STATUS (None: not queryable).
ContextSource = Callable[[int, int, int], list[Extent]] | None

CHANGED_PREFIX = "mirrorpool:changed:"
CHANGED_FLAG = 1  # block status flag in mirrorpool:changed:G: the range changed since G
TRIGGER_LU = ".trigger"
TRIGGER_LU_SIZE = 64 * 1024
TRIGGER_PATH_SIZE = 4096
RECORD_MAGIC = "MPTRIGGER 1"
MUTATIONS = frozenset({Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM})
LINK_FENCE_TIMEOUT = 30.0  # seconds an older link connection gets to finish its requests


class Export:
    kind = "primary"
    read_only = False
    writes_primary = False

    def __init__(self, device: Device, name: str, lu: LogicalUnit | None) -> None:
        self.device = device
        self.name = name
        self.wire_name = name  # as the host asked for it (NAME:replica:UUID names NAME)
        self.lu = lu
        self.contexts: dict[str, ContextSource] = {}
        self._last_answer: bytes = b""

    @property
    def size(self) -> int:
        raise NotImplementedError

    @property
    def description(self) -> str:
        return self.name

    def attach(self) -> None: ...

    def detach(self) -> None: ...

    @property
    def writes_copied(self) -> bool:
        """Does a write here also go to a backup (or a replication journal) right now?"""
        return False

    @property
    def admits_ahead(self) -> bool:
        """Should a connection admit every whole mutation it has received before
        carrying out the first?  Worth it where admission queues work that one
        system call then does for all of them (a replication journal's records)."""
        return False

    def admit(self, cmd: Command, payload: memoryview) -> object | None:
        return None

    def read_into(self, buf: memoryview, offset: int) -> None:
        answer = self._last_answer
        end = offset + len(buf)
        chunk = answer[offset:end]
        buf[: len(chunk)] = chunk
        buf[len(chunk) :] = bytes(len(buf) - len(chunk))

    def write(self, ticket: object, data: memoryview, offset: int, fua: bool) -> None:
        raise InvalidRequest("this export does not take writes")

    def zero(self, ticket: object, cmd: Command) -> None:
        raise InvalidRequest("this export does not take write-zeroes")

    def trim(self, ticket: object, cmd: Command) -> None:
        raise InvalidRequest("this export does not take trims")

    def trigger(self, ticket: object) -> dict:
        raise InvalidRequest("this export does not take triggers")

    def flush(self) -> None: ...

    def cache(self, offset: int, length: int) -> None: ...

    def _answer(self, pending: PendingTrigger) -> dict:
        answers = self.device.triggers.complete(pending)
        doc = {"trigger_id": pending.id, "generations": answers}
        self._last_answer = (json.dumps(doc) + "\n").encode()
        return doc


class PrimaryExport(Export):
    kind = "primary"
    writes_primary = True

    def __init__(self, device: Device, lu: LogicalUnit) -> None:
        super().__init__(device, lu.name, lu)
        # a remote copy takes writes from its replication link only
        self.read_only = device.remotes.source_of(lu.name) is not None
        self.writes_primary = not self.read_only
        volume = lu.volume
        self.volume = volume
        self.contexts[BASE_ALLOCATION] = volume.primary.extents
        self.contexts[TRIGGER_CONTEXT] = None
        for member in volume.live_generations():
            gen = member.gen
            self.contexts[f"{CHANGED_PREFIX}{gen}"] = _changed_source(
                lambda g=gen: volume.changed_since(g), volume.size  # type: ignore[misc]
            )

    @property
    def size(self) -> int:
        return self.volume.size

    @property
    def description(self) -> str:
        assert self.lu is not None
        return f"mirrorpool LU {self.name} ({self.lu.record.uuid})"

    @property
    def writes_copied(self) -> bool:
        return self.volume.active is not None or self.name in self.device.remotes

    @property
    def admits_ahead(self) -> bool:
        # the first write carried out persists the journal records of all of them
        return self.name in self.device.remotes

    def admit(self, cmd: Command, payload: memoryview) -> object | None:
        if cmd.type in MUTATIONS:
            if self.device.remotes.writes_refused(self.name):
                raise StoreError(Errno.EPERM, f"LU {self.name} is being brought in line with "
                                              "its remote copy: writes wait until that ends")
            replicator = self.device.remotes.replicator(self.name)
            if replicator is None:
                return self.volume.begin(cmd.offset, cmd.length)
            kind, data = _replicated(cmd, payload)

            def journal(seq: int) -> None:
                replicator.on_mutation(kind, seq, cmd.offset, cmd.length, data)

            return self.volume.begin(cmd.offset, cmd.length, journal)
        if cmd.type == Cmd.TRIGGER:
            origin = parse_forwarded(bytes(payload))
            if origin is not None:
                return self.device.triggers.begin([self.name], check_label(
                    str(origin.get("label", ""))), "link", origin)
            return self.device.triggers.begin([self.name], _label(payload), "in-band")
        return None

    def _mutate(self, ticket: object, fua: bool, run: Callable[..., None], *args: object) -> None:
        """Apply a mutation, ``run(*args)``; on a replicated LU, keeping the remote copy exact.

        The arguments go separately, so a write to an LU that is not replicated
        makes no closure on its way.
        """
        replicator = self.device.remotes.replicator(self.name)
        if replicator is None:  # not replicated, or the link went away since admission
            run(*args)
            return
        replicator.carry_out(ticket, run, *args)  # type: ignore[arg-type]
        if fua:
            try:
                replicator.sync_journal()
            except OSError as exc:  # the data is written, its record not made durable
                raise StoreError(Errno.EIO, f"replication journal: {exc}") from None
        if replicator.state != CONSISTENT:
            replicator.save_fallback()
        replicator.wait_remote(ticket.seq or 0)  # type: ignore[attr-defined]

    def read_into(self, buf: memoryview, offset: int) -> None:
        self.volume.primary.read_into(buf, offset)

    def write(self, ticket: object, data: memoryview, offset: int, fua: bool) -> None:
        self._mutate(ticket, fua, self.volume.write, ticket, data, offset, fua)

    def zero(self, ticket: object, cmd: Command) -> None:
        def run() -> None:
            self.volume.zero(
                ticket, cmd.offset, cmd.length,  # type: ignore[arg-type]
                may_trim=not cmd.flags & CmdFlag.NO_HOLE,
                fast=bool(cmd.flags & CmdFlag.FAST_ZERO),
                fua=bool(cmd.flags & CmdFlag.FUA),
            )

        self._mutate(ticket, bool(cmd.flags & CmdFlag.FUA), run)

    def trim(self, ticket: object, cmd: Command) -> None:
        def run() -> None:
            self.volume.trim(ticket, cmd.offset, cmd.length,  # type: ignore[arg-type]
                             bool(cmd.flags & CmdFlag.FUA))

        self._mutate(ticket, bool(cmd.flags & CmdFlag.FUA), run)

    def trigger(self, ticket: object) -> dict:
        return self._answer(ticket)  # type: ignore[arg-type]

    def abandon(self, ticket: object) -> None:
        replicator = self.device.remotes.replicator(self.name)
        if replicator is not None and getattr(ticket, "kind", None) == "write":
            replicator.abandon(ticket)  # type: ignore[arg-type]
        else:
            self.volume.abandon(ticket)  # type: ignore[arg-type]

    def flush(self) -> None:
        self.volume.flush()
        try:
            self.device.remotes.sync_journal(self.name)
        except OSError as exc:  # the data is durable, the journal may not be
            raise StoreError(Errno.EIO, f"replication journal: {exc}") from None

    def cache(self, offset: int, length: int) -> None:
        self.volume.primary.cache(offset, length)


class ReplicaExport(PrimaryExport):
    """NAME:replica:UUID, the replication link into a remote copy: the one writer it has.

    The source LU's uuid in the name means a link from any other LU, or to an LU
    that has since been promoted, finds no export.
    """

    kind = "replica"

    def __init__(self, device: Device, lu: LogicalUnit) -> None:
        super().__init__(device, lu)
        self.read_only = False
        self.writes_primary = True

    def attach(self) -> None:
        """Fence the link's older connections before this one takes a request.

        After a cut, the source reconnects and resends from its last flushed
        point, while the old connection may still hold (or later receive) requests
        it sent before the cut: applied after the new ones, they would undo them.
        Ending the old connection first gives everything it admitted a lower
        sequence number than anything this one sends.
        """
        assert self.lu is not None
        for session in link_sessions(self.lu):
            session.disconnect()
            if not session.finished.wait(LINK_FENCE_TIMEOUT):
                raise StoreError(Errno.EIO, "an older connection of this replication link "
                                            "did not end")

    def admit(self, cmd: Command, payload: memoryview) -> object | None:
        if (cmd.type in MUTATIONS or cmd.type == Cmd.TRIGGER) and \
                self.device.remotes.source_of(self.name) is None:
            raise StoreError(Errno.EPERM, f"LU {self.name} was promoted: it takes no more"
                                          " writes from its replication link")
        if cmd.type in MUTATIONS:
            self.device.remotes.note_applied(self.name, cmd.length)
        return super().admit(cmd, payload)


class GenerationExport(Export):
    kind = "generation"
    read_only = True

    def __init__(self, device: Device, lu: LogicalUnit, gen: int) -> None:
        super().__init__(device, f"{lu.name}@{gen}", lu)
        self.gen = gen
        self.volume = lu.volume
        self.view: GenerationView = lu.volume.generation_view(gen)
        self.contexts[BASE_ALLOCATION] = self.view.extents
        volume = self.volume
        for member in volume.live_generations():
            older = member.gen
            if older is not None and older != gen:
                self.contexts[f"{CHANGED_PREFIX}{older}"] = _changed_source(
                    lambda o=older: volume.changed_between(o, gen), volume.size  # type: ignore[misc]
                )

    @property
    def size(self) -> int:
        return self.volume.size

    @property
    def description(self) -> str:
        return f"mirrorpool LU {self.volume.name} generation {self.gen} (read-only)"

    def attach(self) -> None:
        with self.volume.seq.lock:
            member = self.volume.member_of(self.gen)
            member.readers += 1
            self._member = member

    def detach(self) -> None:
        with self.volume.seq.lock:
            self._member.readers -= 1

    def read_into(self, buf: memoryview, offset: int) -> None:
        self.view.read_into(buf, offset)


class TriggerPathExport(Export):
    """NAME:trigger: a WRITE here is a trigger for NAME; read back the last answer."""

    kind = "trigger-path"

    def __init__(self, device: Device, lu: LogicalUnit) -> None:
        super().__init__(device, f"{lu.name}:trigger", lu)

    @property
    def size(self) -> int:
        return TRIGGER_PATH_SIZE

    @property
    def description(self) -> str:
        return f"trigger path of LU {self.lu.name}: every write makes a backup"  # type: ignore[union-attr]

    def admit(self, cmd: Command, payload: memoryview) -> object | None:
        if cmd.type == Cmd.WRITE:
            assert self.lu is not None
            return self.device.triggers.begin([self.lu.name], _label(payload), "path")
        return None

    def write(self, ticket: object, data: memoryview, offset: int, fua: bool) -> None:
        self._answer(ticket)  # type: ignore[arg-type]

    def zero(self, ticket: object, cmd: Command) -> None:
        pass  # the answer area is not storage: zeroing it changes nothing

    def trim(self, ticket: object, cmd: Command) -> None:
        pass


class TriggerLuExport(Export):
    """.trigger: a WRITE at offset 0 of a trigger record splits the LUs it names."""

    kind = "trigger-lu"

    def __init__(self, device: Device) -> None:
        super().__init__(device, TRIGGER_LU, None)

    @property
    def size(self) -> int:
        return TRIGGER_LU_SIZE

    @property
    def description(self) -> str:
        return "trigger LU: write a trigger record to make consistent backups"

    def admit(self, cmd: Command, payload: memoryview) -> object | None:
        if cmd.type != Cmd.WRITE:
            return None
        if cmd.offset != 0:
            raise InvalidRequest("a trigger record must be written at offset 0")
        names, label = parse_trigger_record(bytes(payload))
        return self.device.triggers.begin(names, label, "trigger-lu")

    def write(self, ticket: object, data: memoryview, offset: int, fua: bool) -> None:
        self._answer(ticket)  # type: ignore[arg-type]

    def zero(self, ticket: object, cmd: Command) -> None:
        pass

    def trim(self, ticket: object, cmd: Command) -> None:
        pass


def parse_trigger_record(raw: bytes) -> tuple[list[str], str]:
    """Parse a trigger record: 'MPTRIGGER 1', then 'lu NAME' lines and an optional 'label'."""
    text_bytes = raw.rstrip(b"\0")
    if b"\0" in text_bytes:
        raise InvalidRequest("trigger record: NUL inside the record")
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("trigger record is not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != RECORD_MAGIC:
        raise InvalidRequest(f"trigger record must start with the line {RECORD_MAGIC!r}")
    names: list[str] = []
    label = ""
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        value = value.strip()
        if key == "lu" and value:
            names.append(value)
        elif key == "label":
            label = value
        else:
            raise InvalidRequest(f"trigger record: cannot read the line {line!r}")
    if not names:
        raise InvalidRequest("trigger record names no LU (add a line 'lu NAME')")
    return names, label


def _replicated(cmd: Command, payload: memoryview) -> tuple[Kind, bytes | memoryview]:
    if cmd.type == Cmd.WRITE:
        return Kind.WRITE, payload
    if cmd.type == Cmd.WRITE_ZEROES:
        return Kind.ZERO, b"" if cmd.flags & CmdFlag.NO_HOLE else b"\x01"
    return Kind.TRIM, b""


def _label(payload: memoryview) -> str:
    raw = bytes(payload).rstrip(b"\0")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return text.strip() if text.isprintable() or not text else ""


def _changed_source(chunks_now: Callable[[], object], size: int) -> ContextSource:
    def source(offset: int, length: int, limit: int) -> list[Extent]:
        chunks = chunks_now()
        runs = byte_extents(chunks, size, offset, length)  # type: ignore[arg-type]
        return [
            Extent(off, n, AllocationFlag(CHANGED_FLAG if changed else 0))
            for off, n, changed in runs[:limit]
        ]

    return source


def link_sessions(lu: LogicalUnit) -> list:
    """The connections of a replication link into this LU (its copy's one writer)."""
    return [s for s in list(lu.sessions)
            if getattr(getattr(s, "export", None), "kind", "") == ReplicaExport.kind]


def resolve_export(device: Device, name: str) -> Export | None:
    """The export a host asked for by name, or None if there is none."""
    if name == TRIGGER_LU:
        return TriggerLuExport(device)
    if name.endswith(":trigger"):
        lu = device.find_lu(name[: -len(":trigger")])
        return TriggerPathExport(device, lu) if lu else None
    if ":replica:" in name:
        base, _, source_uuid = name.partition(":replica:")
        lu = device.find_lu(base)
        source = device.remotes.source_of(base) if lu else None
        if lu is None or source is None or source[2] != source_uuid:
            return None
        export = ReplicaExport(device, lu)
        export.wire_name = name
        return export
    base, at, gen = name.partition("@")
    lu = device.find_lu(base)
    if lu is None:
        return None
    if not at:
        return PrimaryExport(device, lu)
    if not gen.isdigit():
        return None
    try:
        return GenerationExport(device, lu, int(gen))
    except NotFound:
        return None


def list_exports(device: Device) -> list[tuple[str, str]]:
    out = [(TRIGGER_LU, "trigger LU")]
    for lu in device.list_lus():
        out.append((lu.name, f"mirrorpool LU {lu.name}"))
        for member in lu.volume.live_generations():
            out.append((f"{lu.name}@{member.gen}", f"generation {member.gen} of {lu.name}"))
    return out


def match_contexts(export: Export, queries: tuple[str, ...]) -> list[str]:
    """Context names selected by SET/LIST_META_CONTEXT queries ("ns:" selects a namespace)."""
    available = list(export.contexts)
    if not queries:
        return available
    chosen: list[str] = []
    for query in queries:
        for name in available:
            hit = name == query or (query.endswith(":") and name.startswith(query))
            if hit and name not in chosen:
                chosen.append(name)
    return chosen


__all__ = ["Export", "MirrorpoolError", "list_exports", "match_contexts", "resolve_export"]
