"""Replication of one primary to a remote primary backup LU on another device.

The link is an NBD connection to the remote device, with the in-band TRIGGER
extension: this device is an ordinary NBD client of the remote one, which needs
no second code path.  Two ways to feed it:

* **journaling** (state ``consistent``): every mutation and every TRIGGER is
  appended to the replication journal when the sequencer numbers it, and the
  sender replays the journal in that order, so the remote device applies one
  ordered stream and splits its pool at the same cut.
* **refreshing** (states ``syncing`` and ``inconsistent``): mutations only mark
  chunks dirty and the sender copies those chunks' current data, each read
  ordered by the sequencer.  No remote generation is made meanwhile; triggers
  are answered locally and reported as not replicated.  Once nothing is dirty,
  journaling resumes at one point of the sequence.

The journal falls back to refreshing when it is full; the remote copy is then
``inconsistent`` until the refresh completes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from urllib.parse import quote

from pyroaring import BitMap

from mirrorpool.mirror.changes import CHUNK, chunk_runs, chunk_span
from mirrorpool.mirror.sequencer import Op
from mirrorpool.mirror.volume import MirroredVolume
from mirrorpool.nbd.client import REPLY_TYPE_TRIGGER, NbdClient, NbdError
from mirrorpool.nbd.codec import REQUEST_HEADER_SIZE
from mirrorpool.nbd.constants import TRIGGER_CONTEXT, Cmd, Errno, Rep
from mirrorpool.replication.checksums import differing, digests_of
from mirrorpool.replication.journal import (
    JOURNALLED_WRITE_OVERHEAD,
    Entry,
    JournalFull,
    Kind,
    Record,
    ReplicationJournal,
    encode,
)
from mirrorpool.store import StoreError

log = logging.getLogger("mirrorpool.replication")

CONSISTENT = "consistent"
SYNCING = "syncing"
REPLAYING = "replaying"  # after a crash here: the journal is sent, then a refresh
INCONSISTENT = "inconsistent"
REVERSING = "reversing"  # being brought in line from the remote copy: the link stays stopped
REFRESH_RUN = 256  # chunks per refresh step (1 MiB)
COMPARE_RUN = 4096  # chunks per compare step (16 MiB read here, 64 KiB of digests fetched)
WINDOW = 64  # records sent before their replies are read
WINDOW_BYTES = 8 << 20
GATHER_FOR = 0.002  # async mode: seconds to wait for more records after a small window
STAMP_EVERY = 0.01  # seconds between time stamps of journalled records
FLUSH_EVERY = 0.05  # seconds between flushes of the remote copy (and journal trims)
SAVE_EVERY = 1.0  # seconds between saves of the acknowledged position in the catalog
# In-band TRIGGER payload of a forwarded trigger: NUL, then JSON (labels never hold NUL).
FORWARDED = b"\0"


class RemoteWriteFailed(NbdError):
    """The remote device answered a write of the link with an error."""


@dataclass
class LinkOptions:
    """How a link behaves; kept as JSON with the link in the catalog."""

    sync_timeout: float = 5.0  # sync mode: wait this long for the remote, then go on async
    # (0: wait until it answers, or until the link gives up after give_up_after)
    link_timeout: float = 30.0  # an unanswered request this old means the link is down
    give_up_after: float = 600.0  # link down this long: stop journaling, refresh later
    nbd_address: str | None = None  # HOST:PORT of the remote NBD server, if not the one it reports
    tls_ca: str | None = None  # verify the remote device's certificate with this CA
    tls_cert: str | None = None  # this device's client certificate and key
    tls_key: str | None = None

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> LinkOptions:
        doc = json.loads(text or "{}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


@dataclass
class RemoteConfig:
    lu: str
    device: str  # the remote device's control API
    nbd: str  # the remote LU over NBD
    remote: str  # the remote LU's name
    mode: str = "async"
    limit: int = 1 << 30
    acked_seq: int = 0
    state: str = SYNCING
    dirty: BitMap = field(default_factory=BitMap)
    options: LinkOptions = field(default_factory=LinkOptions)


def forwarded_payload(trigger_id: str, label: str, seq: int, gen: int) -> bytes:
    return FORWARDED + json.dumps({"trigger_id": trigger_id, "label": label,
                                   "origin_seq": seq, "origin_gen": gen}).encode()


def parse_forwarded(payload: bytes) -> dict | None:
    if not payload.startswith(FORWARDED):
        return None
    try:
        doc = json.loads(payload[1:].decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("trigger_id"), str) else None


def _written(entry: Entry) -> int:
    """Bytes of data a journalled record carries (a WRITE's payload)."""
    return len(entry.data) - JOURNALLED_WRITE_OVERHEAD if entry.kind == Kind.WRITE else 0


class Replicator:
    def __init__(self, config: RemoteConfig, volume: MirroredVolume, journal: ReplicationJournal,
                 save: Callable[[Replicator], None],
                 remote_digests: Callable[[int, int], bytes] | None = None,
                 tls: ssl.SSLContext | None = None,
                 trigger_committed: Callable[[str], bool] = lambda _id: False) -> None:
        self.config = config
        self.volume = volume
        self.journal = journal
        self._save = save
        self._remote_digests = remote_digests
        self._tls = tls
        self.state = config.state
        self.dirty = config.dirty  # chunks that differ on the remote device: copied
        self.compare = BitMap()  # chunks that may differ: compared by digest, copied if so
        self.compared_bytes = 0
        self.down_since: float | None = None  # since when the remote device is unreachable
        self._writes_failing = False
        self.acked_seq = config.acked_seq  # on the remote device's stable storage
        self.replied_seq = config.acked_seq  # answered by the remote device
        self.connected = False
        self.degraded = False  # sync mode gave up waiting: writes go on as in async mode
        self.last_error = ""
        self.last_remote_trigger: dict | None = None
        self.not_replicated = 0  # triggers answered locally while the copy was not consistent
        self.sent_bytes = 0
        # journal records sent, in windows_sent windows (sent again after a reconnection:
        # counted again)
        self.records_sent = 0
        self.windows_sent = 0
        self._overflow = False
        # A TRIGGER is sent once its split here is complete: every write before it
        # applied here as it was sent, so a crash cannot leave the remote generation
        # holding a write this device's generation lacks.  seq -> True: send it;
        # False: the split failed here, never send it.  TRIGGERs journalled before
        # this start were complete if the catalog says they were answered.
        self._triggers_done: dict[int, bool] = {}
        self._triggers_lock = threading.Lock()
        self._journalled_before_start = journal.last_seq
        self._trigger_committed = trigger_committed
        # after a crash of this device: the journal is sent up to here, then the dirty
        # chunks (those in flight at the crash, and every write since) are copied
        self._replay_until = 0
        self._connections = 0  # the sender's connections so far
        self._kicked = False  # the flusher ended the sender's connection (see _flush_loop)
        self._fallback_saved = True  # the catalog knows journaling stopped (see _mutate)
        # (seq, time journalled), one every STAMP_EVERY: how old the oldest unanswered
        # record is, i.e. the lag in seconds
        self._stamps: deque[tuple[int, float]] = deque()
        self._replied = threading.Condition()
        self._wake = threading.Event()
        self._stopping = False
        self._stop_event = threading.Event()
        self._client: NbdClient | None = None
        self._thread = threading.Thread(target=self._run, name=f"replicate-{config.lu}",
                                        daemon=True)
        self._flusher = threading.Thread(target=self._flush_loop,
                                         name=f"replicate-flush-{config.lu}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._flusher.start()

    def stop(self) -> None:
        self._stopping = True
        self._stop_event.set()
        self._wake.set()
        client = self._client
        if client is not None:
            # a send or a reply the remote device never gives must not hold up the stop
            with contextlib.suppress(OSError):
                # the TCP socket's own shutdown: an SSLSocket's would drop its TLS
                # state under the sender thread
                socket.socket.shutdown(client.sock, socket.SHUT_RDWR)
        with self._replied:
            self._replied.notify_all()
        for thread in (self._thread, self._flusher):
            if thread.ident is not None:  # started
                thread.join(10)

    # ------------------------------------------------------------ data path (sequencer lock held)

    def on_mutation(self, kind: Kind, seq: int, offset: int, length: int,
                    payload: bytes | memoryview = b"") -> None:
        if self.state == CONSISTENT:
            try:
                # the payload is the server's buffer: encode copies it, once
                self.journal.append_encoded(seq, kind, encode(kind, seq, offset, length,
                                                              payload))
                now = time.monotonic()
                if not self._stamps or now - self._stamps[-1][1] > STAMP_EVERY:
                    self._stamps.append((seq, now))
                if not self._wake.is_set():  # set: the sender has not looked since
                    self._wake.set()
                return
            except JournalFull as exc:
                log.warning("replication falls back to changed-block tracking",
                            extra={"lu": self.config.lu, "why": str(exc)})
                self._stop_journaling(seq)
        first, stop = chunk_span(offset, length)
        self.dirty.add_range(first, stop)
        self._wake.set()

    def on_trigger(self, seq: int, trigger_id: str, label: str, gen: int) -> bool:
        """Forward a TRIGGER in its place; False: it is not replicated (copy not consistent)."""
        if self.state != CONSISTENT:
            self.not_replicated += 1
            return False
        try:
            self.journal.append(Record(Kind.TRIGGER, seq, 0, 0,
                                       forwarded_payload(trigger_id, label, seq, gen)))
        except JournalFull:
            self._stop_journaling(seq)
            self.not_replicated += 1
            return False
        self._wake.set()
        return True

    def save_fallback(self) -> None:
        """Before a write made since journaling stopped is answered, the catalog says
        the copy is not consistent.  Else, after a crash, a journal whose STOP record
        could not be written would be replayed as complete, and that write lost.
        (Not under the sequencer lock: the catalog's lock is taken before it.)"""
        if not self._fallback_saved:
            self._save(self)
            self._fallback_saved = True

    def sync_journal(self) -> None:
        """Make the journal durable (a host's FLUSH or FUA write).

        After a failed sync the records' durability is unknown, and a retry could
        not tell (Linux reports a failed write-back once): journaling stops, and
        the chunks concerned are copied to the remote device instead.
        """
        if self.state != CONSISTENT:
            return  # nothing journalled since: the chunks written are copied instead
        try:
            self.journal.sync()
        except OSError as exc:
            log.error("replication journal not made durable: falling back to "
                      "changed-block tracking", extra={"lu": self.config.lu, "error": str(exc)})
            self.diverged(BitMap())
            raise

    def trigger_done(self, seq: int, ok: bool) -> None:
        """The split of the TRIGGER ``seq`` is complete here (``ok``), or failed."""
        with self._triggers_lock:
            self._triggers_done[seq] = ok
        self._wake.set()

    def _trigger_ready(self, entry: Entry) -> bool | None:
        """True: send this TRIGGER; False: never (no split here); None: not yet."""
        with self._triggers_lock:
            ok = self._triggers_done.get(entry.seq)
        if ok is None and entry.seq <= self._journalled_before_start:
            doc = parse_forwarded(bytes(entry.wire[REQUEST_HEADER_SIZE:])) or {}
            ok = self._trigger_committed(str(doc.get("trigger_id") or ""))
            with self._triggers_lock:
                self._triggers_done[entry.seq] = ok
        return ok

    def _stop_journaling(self, seq: int) -> None:
        """Fall back to refreshing (sequencer lock held); noted in the journal for a crash."""
        try:
            self.journal.append(Record(Kind.STOP, seq, 0, 0))
        except OSError as exc:  # the state saved in the catalog tells it as well
            log.error("replication journal: cannot note the stop",
                      extra={"lu": self.config.lu, "error": str(exc)})
            # What never reached the file is refreshed from memory like the rest;
            # left queued, every later write would retry it and fail.
            self.journal.discard_queued()
        self.state = INCONSISTENT
        self._fallback_saved = False
        self._overflow = True  # what the journal still holds is refreshed instead
        with self._replied:
            self._replied.notify_all()  # sync writes waiting for the remote go on

    def carry_out(self, op: Op, run: Callable[..., None], *args: object) -> None:
        """Apply a mutation admitted with its journal record, ``run(*args)``.

        The record goes on file before the data changes: after a crash, a write
        whose record is missing was still in flight (and is refreshed).  Once
        journaling stopped, the chunks written are refreshed instead.  If either
        step fails, the range is copied to the remote device instead.
        """
        try:
            if self.state == CONSISTENT:
                self.journal.persist(op.seq or 0)
        except OSError as exc:
            self.abandon(op)  # never applied
            raise StoreError(Errno.EIO, f"replication journal: {exc}") from None
        try:
            run(*args)
        except StoreError:
            self.diverged(BitMap(range(op.start // CHUNK, op.end // CHUNK)))
            raise

    def abandon(self, op: Op) -> None:
        """A mutation admitted and never carried out: finished, and its range, whose
        record may be in the journal, copied to the remote device instead."""
        self.diverged(BitMap(range(op.start // CHUNK, op.end // CHUNK)))
        self.volume.abandon(op)

    def diverged(self, chunks: BitMap) -> None:
        """These chunks may differ from what the journal says (a failed or abandoned write)."""
        with self.volume.seq.lock:
            if self.state == CONSISTENT:
                self._stop_journaling(self.volume.seq.last_seq)
            self.dirty |= chunks
        self._wake.set()

    def journal_unsent_on_start(self) -> None:
        """Start-up: a link saved while not journaling still owes the journal's records.

        They become chunks to copy, as when the fallback first happened (the flag
        saying so lives in memory only).
        """
        if self.state == REPLAYING and not self.journal.stopped:
            # stopped during a replay: it goes on where it was (the chunks written
            # since the crash were saved as dirty at the stop)
            self._replay_until = self.journal.last_seq
            return
        if self.state in (REPLAYING, INCONSISTENT, SYNCING) and \
                self.journal.last_seq > self.acked_seq:
            self._overflow = True
        if self.state == REPLAYING:
            self.state = INCONSISTENT

    def compare_all(self) -> None:
        """Stop trusting the remote copy: compare every chunk, copy those that differ."""
        with self.volume.seq.lock:
            if self.state in (CONSISTENT, REPLAYING):
                self._stop_journaling(self.volume.seq.last_seq)
            self.state = INCONSISTENT
            self.compare |= BitMap(range((self.volume.size + CHUNK - 1) // CHUNK))
            self.compare -= self.dirty
        self._wake.set()

    def after_crash(self, divergent: BitMap) -> None:
        """Start-up after a crash: send the journal first, then refresh ``divergent``.

        A TRIGGER answered before the crash had every earlier write finished, so
        the journal up to it is exactly what this device holds; writes in flight
        at the crash may have been journalled and not applied (or the reverse),
        which is what copying those chunks again settles.
        """
        self.dirty |= divergent
        if self.state == REPLAYING:
            # A crash during the replay of an earlier crash: the journal still holds
            # what that replay had not sent (answered triggers among it), but the
            # chunks written since were marked dirty in memory, and not all saved:
            # once the journal is sent, every chunk is compared (saved as to copy).
            nchunks = (self.volume.size + CHUNK - 1) // CHUNK
            self.compare |= BitMap(range(nchunks)) - self.dirty
        if self.state in (CONSISTENT, REPLAYING):
            # nothing more is journalled: later writes are marked dirty, and later
            # triggers are answered as not replicated, as while refreshing
            self.state = REPLAYING
            self._replay_until = self.journal.last_seq

    def _end_replay(self) -> None:
        """The journal is sent: copy the dirty chunks, compare those to compare."""
        with self.volume.seq.lock:
            self.state = INCONSISTENT

    def wait_remote(self, seq: int) -> None:
        """Sync mode: return once the remote device answered the mutation ``seq``."""
        if self.config.mode != "sync" or self.state != CONSISTENT or self.degraded:
            return
        timeout = self.config.options.sync_timeout or None  # 0: as long as B takes
        with self._replied:
            ok = self._replied.wait_for(
                lambda: self.replied_seq >= seq or self._stopping or self.state != CONSISTENT,
                timeout)
        if not ok:
            self.degraded = True
            log.warning("sync replication degraded: the remote device did not answer in time",
                        extra={"lu": self.config.lu, "timeout_s": self.config.options.sync_timeout})

    # ------------------------------------------------------------ status

    def status(self) -> dict:
        last = self.volume.seq.last_seq
        lag_seq = max(0, self.journal.last_seq - self.replied_seq) if self.state == CONSISTENT \
            else None
        replied = self.replied_seq
        stamps = self._stamps.copy()  # atomic, unlike iterating while others append
        waiting = [t for seq, t in stamps if seq > replied]
        lag_seconds = time.monotonic() - waiting[0] if waiting and lag_seq else 0.0
        return {
            "lu": self.config.lu,
            "device": self.config.device,
            "remote": self.config.remote,
            "nbd": self.config.nbd,
            "mode": self.config.mode,
            "state": self.state,
            "connected": self.connected,
            "degraded": self.degraded,
            "last_seq": last,
            "replied_seq": self.replied_seq,
            "acked_seq": self.acked_seq,
            "lag_seq": lag_seq,
            "lag_bytes": self.journal.used,
            "lag_seconds": round(lag_seconds, 3),
            "journal_used": self.journal.used,
            "journal_limit": self.config.limit,
            "dirty_bytes": len(self.dirty) * CHUNK,
            "compare_bytes": len(self.compare) * CHUNK,
            "compared_bytes": self.compared_bytes,
            "down_seconds": round(time.monotonic() - self.down_since, 3)
            if self.down_since is not None and not self.connected else 0.0,
            "sent_bytes": self.sent_bytes,
            "journal_writes": self.journal.writes,
            "records_sent": self.records_sent,
            "windows_sent": self.windows_sent,
            "triggers_not_replicated": self.not_replicated,
            "last_remote_trigger": self.last_remote_trigger,
            "last_error": self.last_error,
        }

    def caught_up(self) -> bool:
        return (self.state == CONSISTENT and self.replied_seq >= self.journal.last_seq
                and self.acked_seq >= self.journal.last_seq)

    # ------------------------------------------------------------ sender

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            client = None
            if self.down_since is None:
                self.down_since = time.monotonic()
            try:
                client = self._connect(contexts=(TRIGGER_CONTEXT,))
                if not client.can_trigger:
                    raise NbdError("the remote device does not offer the TRIGGER extension")
                if client.size != self.volume.size:
                    raise NbdError(f"remote LU is {client.size} bytes, this one "
                                   f"{self.volume.size}: refusing to replicate")
                self._client = client
                # resume after what the remote device holds on stable storage, before
                # the flusher can see this connection as up
                self.replied_seq = self.acked_seq
                self._connections += 1  # after the reset: see _flush_loop
                if not self._writes_failing:
                    self.down_since = None
                self.connected = True
                self.last_error = ""
                backoff = 0.1
                self._serve(client)
            except (OSError, NbdError) as exc:
                # a remote device that takes the connection but fails every write is
                # down as well: its outage goes on across reconnections
                self._writes_failing = isinstance(exc, RemoteWriteFailed)
                kicked, self._kicked = self._kicked, False
                if kicked and not self._writes_failing:
                    backoff = 0.0  # at once: see _kick_sender
                    log.info("replication link reconnecting: the flusher reconnected",
                             extra={"lu": self.config.lu})
                elif not self._stopping:
                    self.last_error = str(exc)
                    log.warning("replication link down", extra={"lu": self.config.lu,
                                                                 "error": str(exc)})
            except Exception as exc:  # a local read error, say: the link must not die
                self.last_error = f"internal error: {exc}"
                log.exception("replication link failed", extra={"lu": self.config.lu})
            finally:
                self.connected = False
                self._client = None
                if client is not None:
                    client.abort()
            if self._stopping:
                return
            self._give_up_if_gone_too_long()
            # not _wake: host writes set it all the time, and would turn the
            # back-off into a loop of connection attempts
            self._stop_event.wait(backoff)
            backoff = min(max(backoff * 2, 0.1), 2.0)

    def _kick_sender(self) -> None:
        """End the sender's connection: it reconnects at once and resends from acked."""
        client = self._client
        if client is not None:
            self._kicked = True
            with contextlib.suppress(OSError):
                socket.socket.shutdown(client.sock, socket.SHUT_RDWR)
            self._wake.set()

    def _connect(self, contexts: tuple[str, ...] = (), uri: str | None = None) -> NbdClient:
        try:
            return NbdClient(uri or self.config.nbd, contexts=contexts,
                             timeout=self.config.options.link_timeout, tls=self._tls)
        except NbdError as exc:
            if exc.code == Rep.ERR_UNKNOWN:
                raise NbdError("the remote device has no link into this LU's copy: it was "
                               "promoted there, deleted, or is the copy of another LU "
                               f"({exc})") from None
            raise

    def _give_up_if_gone_too_long(self) -> None:
        """Down longer than give_up_after: stop filling the journal; refresh on return."""
        down = self.down_since
        if down is None or time.monotonic() - down < self.config.options.give_up_after:
            return
        with self.volume.seq.lock:
            if self.state != CONSISTENT:
                return
            self._stop_journaling(self.volume.seq.last_seq)
        log.warning("the remote device is gone too long: replication falls back to "
                    "changed-block tracking", extra={"lu": self.config.lu,
                                                     "down_s": round(time.monotonic() - down)})

    def _flush_loop(self) -> None:
        """Make what the remote device answered durable there, on a connection of its own.

        The remote LU is multi-conn consistent, so a FLUSH here covers every write
        the sender saw answered; the sender never waits for the remote disk.
        """
        client: NbdClient | None = None
        since = 0  # the sender's connections when this flusher connected
        while not self._stopping:
            self._stop_event.wait(FLUSH_EVERY)
            # Answered on this connection of the sender's: if it reconnects meanwhile,
            # the remote device may have lost them (a power loss), and the flush below
            # would not cover them.  Read before the target, which it resets first.
            connection = self._connections
            target = self.replied_seq
            if self.state != CONSISTENT or target <= self.acked_seq or not self.connected:
                continue
            try:
                if client is None:
                    # the remote LU's own (read-only) export: a second connection to
                    # the link's export would fence the sender's off
                    since = self._connections
                    client = self._connect(uri=self.config.nbd.rsplit("/", 1)[0] + "/"
                                           + quote(self.config.remote, safe=""))
                    # The remote device may have restarted since the sender's requests
                    # were answered (a power loss takes what it had not flushed), and
                    # an idle sender would not know: it starts again from what is
                    # acknowledged, on a connection this one can vouch for.
                    self._kick_sender()
                client.flush()
            except (OSError, NbdError):
                if client is not None:
                    client.abort()
                client = None
                continue
            with self.volume.seq.lock:
                # a refresh may have started meanwhile and set its own position
                if self.state == CONSISTENT and target > self.acked_seq \
                        and connection == self._connections and connection > since:
                    self.acked_seq = target
        if client is not None:
            client.abort()

    def _serve(self, client: NbdClient) -> None:
        cursor: tuple[int, int] | None = None
        last_save = time.monotonic()
        trimmed = self.acked_seq
        while not self._stopping:
            if self._kicked:  # an idle sender notices no shut-down socket by itself
                raise NbdError("reconnecting, as the flusher did")
            if self.state == REPLAYING and self.replied_seq >= self._replay_until:
                self._end_replay()
            if self.state not in (CONSISTENT, REPLAYING):
                self._refresh(client)
                cursor = None
                trimmed = self.acked_seq
                continue
            batch: list[Entry] = []
            size = 0
            dry = True  # the window holds every record there was
            for entry, after in self.journal.entries_after(self.replied_seq, cursor):
                if entry.kind == Kind.STOP:
                    break  # journaling ended here: the refresh takes over, nothing is sent
                if entry.kind == Kind.TRIGGER:
                    if batch:
                        # A TRIGGER leads a window of its own: every write before it has
                        # been answered without error, so the remote generation lacks
                        # none of them (a failed write is sent again after the link
                        # resumes).
                        dry = False
                        break
                    ready = self._trigger_ready(entry)
                    if ready is None:
                        break  # its split here is not complete yet: trigger_done wakes us
                    if not ready:
                        # no generation here (a crash cut it short, or it failed): none
                        # on the remote device either
                        self.not_replicated += 1
                        self._answered([entry])
                        if after is not None:
                            cursor = after
                        continue
                batch.append(entry)
                if after is not None:  # records read from the files
                    cursor = after
                size += len(entry.data)
                if len(batch) == WINDOW or size >= WINDOW_BYTES:
                    dry = False
                    break
            if batch:
                self._send_window(client, batch)
            acked = self.acked_seq  # moved on by the flusher
            if acked > trimmed:
                trimmed = acked
                with self._triggers_lock:  # never sent again
                    for seq in [s for s in self._triggers_done if s <= acked]:
                        del self._triggers_done[seq]
                if self.journal.trim(acked):
                    cursor = None
                now = time.monotonic()
                if now - last_save > SAVE_EVERY:
                    # resuming from an older position only sends records again
                    self._save(self)
                    last_save = now
            if self.degraded and self.replied_seq >= self.journal.last_seq:
                self.degraded = False  # caught up: sync mode waits for the remote again
            if not batch:
                self._wake.wait(FLUSH_EVERY)
                self._wake.clear()
            elif dry and len(batch) < WINDOW // 2 and self.config.mode != "sync":
                # Caught up: let records gather.  A window of one or two costs the host
                # path nearly as much as a full one (the system calls, the wake-ups, the
                # turns at the interpreter), and async mode can lag a little more.
                self._stop_event.wait(GATHER_FOR)

    def _send_window(self, client: NbdClient, batch: list[Entry]) -> None:
        """Send records back to back, then take their replies (in any order).

        The remote device numbers requests as they arrive, so the order on the
        wire is the order it applies them in; waiting for each reply before the
        next request would cost a round trip per record.  Each record is sent as
        journalled: its cookie is its sequence number.
        """
        index = {entry.seq: i for i, entry in enumerate(batch)}
        if len(index) != len(batch):
            raise NbdError("journal records with the same sequence number")
        for entry in batch:
            if entry.kind == Kind.TRIGGER:
                doc = parse_forwarded(bytes(entry.wire[REQUEST_HEADER_SIZE:])) or {}
                self.last_remote_trigger = {"trigger_id": doc.get("trigger_id"),
                                            "seq": entry.seq, "gen": doc.get("origin_gen"),
                                            "at": time.time()}
        client.send_buffers([entry.wire for entry in batch])
        self.records_sent += len(batch)
        self.windows_sent += 1
        done = bytearray(len(batch))
        received = next_index = 0
        while next_index < len(batch):
            # async mode waits for the window's replies together; sync mode lets each
            # write go as soon as its own is in
            due = len(batch) - received if self.config.mode != "sync" else 1
            failed: RemoteWriteFailed | None = None
            for cookie, error, message, chunks in client.next_replies(due):
                received += 1
                i = index.get(cookie, -1)
                if i < 0 or done[i]:
                    raise NbdError("reply to a request never sent")
                kind = batch[i].kind
                if kind == Kind.TRIGGER:
                    self._trigger_answered(error, message, chunks)
                elif error:
                    failed = failed or RemoteWriteFailed(
                        f"remote device failed a write: {message or error}", error)
                    continue  # not done: the records before it still count as answered
                done[i] = 1
            first = next_index
            while next_index < len(batch) and done[next_index]:
                next_index += 1
            if next_index > first:
                self._answered(batch[first:next_index])
            if failed is not None:
                raise failed

    def _answered(self, entries: list[Entry]) -> None:
        """The remote device answered these records, the next in sequence order."""
        self.sent_bytes += sum(_written(entry) for entry in entries)
        last = entries[-1].seq
        self.down_since = None  # up is when the remote device answers
        self._writes_failing = False
        with self._replied:
            self.replied_seq = last
            self._replied.notify_all()
        while self._stamps and self._stamps[0][0] <= last:
            self._stamps.popleft()

    def _trigger_answered(self, error: int, message: str,
                          chunks: list[tuple[int, bytes]]) -> None:
        last = self.last_remote_trigger if self.last_remote_trigger is not None else {}
        if error:
            # the remote device refused the split (e.g. every member pinned): the
            # stream goes on, and the refusal is reported
            last["refused"] = message or f"error {error}"
            log.warning("remote device refused a forwarded trigger",
                        extra={"lu": self.config.lu, "why": last["refused"]})
            return
        for typ, body in chunks:
            if typ == REPLY_TYPE_TRIGGER:
                answer = json.loads(body)
                gen = (answer.get("generations") or [{}])[0]
                last.update(remote_gen=gen.get("gen"), remote_seq=gen.get("seq"))

    def _read_ordered(self, first: int, stop: int) -> bytearray:
        """The primary's chunks [first, stop), read in sequence with the writes."""
        volume = self.volume
        with volume.seq.lock:
            op = volume.seq.admit(first * CHUNK, stop * CHUNK, "replica-read", False)
        try:
            volume.seq.wait(op)
            start = first * CHUNK
            buf = bytearray(min(stop * CHUNK, volume.size) - start)
            volume.primary.read_into(memoryview(buf), start)
            return buf
        finally:
            volume.seq.finish(op)

    def _copy_runs(self, client: NbdClient, runs: list[tuple[int, int]],
                   data: tuple[bytearray, int] | None = None) -> None:
        """Copy runs of chunks (first, count), sent back to back, then their replies.

        The data comes from the primary, each run read in sequence with the
        writes, or from ``data``: a buffer already read and the chunk it starts at.
        """
        buffers: list[bytes | memoryview] = []
        lengths: dict[int, int] = {}
        for first, count in runs:
            if data is None:
                view = memoryview(self._read_ordered(first, first + count))
            else:
                buf, base = data
                view = memoryview(buf)[(first - base) * CHUNK : (first + count - base) * CHUNK]
            start = first * CHUNK
            if bytes(view).count(0) == view.nbytes:  # C speed, unlike scanning the view
                cookie, parts = client.encode_request(Cmd.WRITE_ZEROES, start, view.nbytes)
            else:
                cookie, parts = client.encode_request(Cmd.WRITE, start, view.nbytes, 0, view)
            lengths[cookie] = view.nbytes
            buffers += parts
        client.send_buffers(buffers)
        for _ in range(len(lengths)):
            cookie, error, message, _chunks = client.next_reply()
            if cookie not in lengths:
                raise NbdError("reply to a request never sent")
            if error:
                raise RemoteWriteFailed(f"remote device failed a write: {message or error}",
                                        error)
            self.sent_bytes += lengths[cookie]
            self.down_since = None
            self._writes_failing = False

    def _compare_step(self, client: NbdClient) -> None:
        """Compare up to COMPARE_RUN chunks by digest; copy the ones that differ."""
        volume = self.volume
        with volume.seq.lock:
            first = self.compare.min()
            stop = min(first + COMPARE_RUN, (volume.size + CHUNK - 1) // CHUNK)
            wanted = BitMap(range(first, stop)) & self.compare
            self.compare.remove_range(first, stop)
        try:
            buf = self._read_ordered(first, stop)
            if self._remote_digests is None:
                differ = wanted
            else:
                theirs = self._remote_digests(first * CHUNK, len(buf))
                differ = differing(first, digests_of(buf), theirs) & wanted
            self.compared_bytes += len(wanted) * CHUNK
            runs = list(chunk_runs(differ, REFRESH_RUN))
            for i in range(0, len(runs), WINDOW):
                self._copy_runs(client, runs[i : i + WINDOW], (buf, first))
        except BaseException:
            with volume.seq.lock:
                self.compare |= wanted
            raise

    def _refresh(self, client: NbdClient) -> None:
        """Copy the dirty chunks' current data, then go back to journaling."""
        volume = self.volume
        self._save(self)  # not consistent, before the journal is forgotten
        if self._overflow:
            # what the journal held and did not reach the remote device, as chunks
            for record in self.journal.every_record_after(self.acked_seq):
                if record.kind in (Kind.WRITE, Kind.ZERO, Kind.TRIM):  # not TRIGGER, STOP
                    first, stop = chunk_span(record.offset, record.length)
                    with volume.seq.lock:
                        self.dirty.add_range(first, stop)
            self.journal.reset()
            self._overflow = False
        while not self._stopping:
            with volume.seq.lock:
                empty = not self.dirty
                to_compare = bool(self.compare) and empty
            if to_compare:
                self._compare_step(client)
                continue
            if empty:
                client.flush()  # what was sent is on the remote device's stable storage
                with volume.seq.lock:
                    if self._overflow:
                        return  # the journal filled again meanwhile: start over
                    if not self.dirty and not self.compare:
                        # from here on, every mutation goes to the journal
                        self.state = CONSISTENT
                        self.degraded = False
                        self.acked_seq = self.replied_seq = volume.seq.last_seq
                        self.journal.reset()
                        break
                continue
            with volume.seq.lock:
                runs = list(itertools.islice(chunk_runs(self.dirty, REFRESH_RUN), WINDOW))
                for first, count in runs:
                    self.dirty.remove_range(first, first + count)
            try:
                self._copy_runs(client, runs)
            except BaseException:
                with volume.seq.lock:
                    for first, count in runs:
                        self.dirty.add_range(first, first + count)
                raise
        if self._stopping:
            return
        with self._replied:
            self._replied.notify_all()
        self._save(self)
        log.info("remote copy consistent", extra={"lu": self.config.lu,
                                                  "remote": self.config.remote})
