"""The NBD server's I/O layer: sockets and threads around the sans-IO codec.

Each connection has one thread that negotiates, then reads requests in order
(header, then any WRITE payload straight into a preallocated buffer) and
gives mutations their sequence numbers.  Quick requests are served right
there; requests that may block (flush, triggers, block status, very large
transfers) go to a small pool of helper threads, so pipelined requests behind
them are served concurrently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from mirrorpool.device.device import Device
from mirrorpool.device.exports import (
    MUTATIONS,
    TRIGGER_CONTEXT,
    Export,
    list_exports,
    match_contexts,
    resolve_export,
)
from mirrorpool.errors import MirrorpoolError
from mirrorpool.metrics import IoStats, OpStats
from mirrorpool.mirror.volume import TriggerRefused
from mirrorpool.nbd import codec as c
from mirrorpool.nbd.constants import Cmd, CmdFlag, Errno, Info, Opt, Rep
from mirrorpool.nbd.polling import PollBudget, PolledReceiver
from mirrorpool.nbd.tls import TlsStream
from mirrorpool.net import ListenError, listen_tcp
from mirrorpool.store import FastZeroUnsupported, StoreError

log = logging.getLogger("mirrorpool.nbd")

MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 * 1024 * 1024
# A WRITE over the maximum is drained and refused up to this size; beyond it
# the client is not speaking NBD sensibly and the connection is closed.
MAX_DRAIN = 4 * MAX_PAYLOAD
MAX_OPTIONS = 4096
READ_BUFFER = 256 * 1024
NEGOTIATION_TIMEOUT = 60.0
MAX_EXTENTS = 1024
_DRAIN_CHUNK = 1 << 20
# Reply chunk type of the mirrorpool TRIGGER extension: a JSON answer.
REPLY_TYPE_TRIGGER = 0x4D50
_ADMITTED = frozenset(int(c) for c in (*MUTATIONS, Cmd.TRIGGER))
_OP_NAMES = {
    int(k): v for k, v in {
        Cmd.READ: "read", Cmd.WRITE: "write", Cmd.FLUSH: "flush", Cmd.TRIM: "trim",
        Cmd.WRITE_ZEROES: "zero", Cmd.CACHE: "cache", Cmd.BLOCK_STATUS: "block_status",
        Cmd.TRIGGER: "trigger",
    }.items()
}


def error_code(exc: Exception) -> Errno:
    """The NBD error a refusal becomes on the wire."""
    if isinstance(exc, StoreError):
        return exc.code
    if isinstance(exc, TriggerRefused):
        return Errno.ENOSPC
    return Errno.EINVAL


# Requests that may block for long are served off the reading thread.
# Up to 1 MiB a copy takes a few hundred microseconds: a hand-off to a helper
# costs more than it saves.
SLOW_TRANSFER = 2 * 1024 * 1024
# A write that is also copied (backup, replication journal) takes twice as
# long: from this size on, helpers let several of them run at once.
SLOW_COPIED_WRITE = 256 * 1024
SLOW_RANGE = 64 * 1024 * 1024
_ALWAYS_SLOW = frozenset(int(c) for c in (Cmd.FLUSH, Cmd.TRIGGER, Cmd.BLOCK_STATUS, Cmd.CACHE))
_FUA = int(CmdFlag.FUA)
_free_buffers: list[mmap.mmap] = []
_buffers_lock = threading.Lock()
MAX_FREE_BUFFERS = 16


_AHEAD = frozenset(int(c) for c in (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM))
MAX_AHEAD = 64  # mutations admitted before the first of them is carried out


def _whole_mutation(buf: memoryview, start: int, end: int) -> bool:
    """Is the next request in ``buf[start:end]`` a mutation that is all there, payload
    and all, and served on the reading thread?"""
    have = end - start
    if have < c.REQUEST_HEADER_SIZE:
        return False
    _, _, typ, _, _, length = c.REQUEST_HEADER.unpack_from(buf, start)
    if typ not in _AHEAD:
        return False
    if typ == Cmd.WRITE:
        return length < SLOW_COPIED_WRITE and have >= c.REQUEST_HEADER_SIZE + length
    return length < SLOW_RANGE


def _is_slow(cmd: c.Command) -> bool:
    if cmd.type in _ALWAYS_SLOW:
        return True
    if cmd.type in (Cmd.READ, Cmd.WRITE):
        return cmd.length >= SLOW_TRANSFER
    return cmd.length >= SLOW_RANGE


def _take_buffer() -> mmap.mmap:
    """A payload buffer: anonymous memory, touched only where requests use it."""
    with _buffers_lock:
        if _free_buffers:
            return _free_buffers.pop()
    return mmap.mmap(-1, MAX_PAYLOAD)


def _give_buffer(buf: mmap.mmap) -> None:
    with _buffers_lock:
        if len(_free_buffers) < MAX_FREE_BUFFERS:
            _free_buffers.append(buf)
            return
    with contextlib.suppress(BufferError):  # a view still refers to it: let GC free it
        buf.close()


class _PeerClosed(Exception):
    pass


class NbdServer:
    def __init__(
        self,
        device: Device,
        tcp: tuple[str, int] | None = ("127.0.0.1", 10809),
        unix_path: str | None = None,
        workers_per_connection: int = 4,
        resolve: Callable[[Device, str], Export | None] = resolve_export,
        io_stats: IoStats | None = None,
        tls: ssl.SSLContext | None = None,
        tls_mode: c.TlsMode | None = None,
        poll: PollBudget | None = None,
    ) -> None:
        """``tls`` is the server-side context; with it, TLS is required unless
        ``tls_mode`` says ON (offered, plain text still served).  ``poll``
        bounds how connections poll their sockets before sleeping (none: never)."""
        if tls_mode is None:
            tls_mode = c.TlsMode.OFF if tls is None else c.TlsMode.REQUIRE
        if tls_mode is not c.TlsMode.OFF and tls is None:
            raise ValueError(f"TLS mode {tls_mode.value} needs a TLS context")
        self.tls = tls
        self.tls_mode = tls_mode
        self.poll = poll
        # nbds:// tells clients that only TLS will do (libnbd's URI convention).
        self._scheme = "nbds" if tls_mode is c.TlsMode.REQUIRE else "nbd"
        self.device = device
        self.io_stats = io_stats or IoStats()
        self.workers_per_connection = max(1, workers_per_connection)
        self.resolve = resolve
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.addresses: list[str] = []
        if tcp is not None:
            self._listen_tcp(*tcp)
        if unix_path is not None:
            self._listen_unix(unix_path)

    def _listen_tcp(self, host: str, port: int) -> None:
        sock = listen_tcp(host, port, "NBD")
        self._listeners.append(sock)
        bound = sock.getsockname()
        self.port = bound[1]
        self.addresses.append(f"{self._scheme}://{host}:{bound[1]}")

    def _listen_unix(self, path: str) -> None:
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a stale socket from a device that is gone
            else:
                probe.close()
                raise ListenError(f"cannot listen on {path}: another server is using it")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ListenError(f"cannot listen on {path}: {exc.strerror}") from exc
        sock.listen(128)
        self._listeners.append(sock)
        self.unix_path = path
        self.addresses.append(f"{self._scheme}+unix:///?socket={path}")

    def start(self) -> None:
        for sock in self._listeners:
            t = threading.Thread(target=self._accept_loop, args=(sock,), name="nbd-accept",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer_name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
            conn = Connection(self, sock, peer_name)
            with self._lock:
                self._connections.add(conn)
            threading.Thread(target=conn.run, name=f"nbd-{peer_name}", daemon=True).start()

    def forget(self, conn: Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish, close every connection."""
        self._stopping.set()
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if getattr(self, "unix_path", None):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            conn.disconnect()
        deadline = time.monotonic() + timeout
        for conn in conns:
            if not conn.finished.wait(max(0.0, deadline - time.monotonic())):
                log.warning("connection still busy at stop", extra={"peer": conn.peer})


class Connection:
    def __init__(self, server: NbdServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        # After STARTTLS a TlsStream, which has the few socket methods used here:
        # the plain path keeps the socket's own, with nothing in between.
        self.sock: socket.socket | TlsStream = sock
        self.peer = peer
        self.codec = c.ServerCodec(tls=server.tls_mode)
        self.finished = threading.Event()
        self._send_lock = threading.Lock()
        self._closing = False
        self._pending = b""  # bytes received during negotiation past its end
        self.export: Export | None = None
        self.writes_primary = False
        self._stats: dict[str, OpStats] = {}
        self._contexts: dict[int, str] = {}
        self._context_export: str | None = None

    # ---------------------------------------------------------------- lifetime

    def run(self) -> None:
        try:
            export = self._negotiate()
            if export is not None:
                self._transmit(export)
        except (c.ProtocolError, _PeerClosed, OSError) as exc:
            if not self._closing:
                log.warning("closing connection", extra={"peer": self.peer, "reason": str(exc)})
        except Exception:
            log.exception("connection failed", extra={"peer": self.peer})
        finally:
            self._closing = True
            try:
                self.sock.close()
            finally:
                self.server.forget(self)
                self.finished.set()

    def disconnect(self) -> None:
        """End the connection from the device's side (shutdown, forced delete)."""
        self._closing = True
        self._shutdown(socket.SHUT_RDWR)

    def _shutdown(self, how: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(how)  # under TLS too, the TCP socket's alone

    # ---------------------------------------------------------------- negotiation

    def _negotiate(self) -> Export | None:
        self.sock.settimeout(NEGOTIATION_TIMEOUT)
        self.sock.sendall(self.codec.greeting())
        options = 0
        while True:
            event = self.codec.next_event()
            if event is c.NEED_DATA:
                data = self.sock.recv(65536)
                self.codec.receive_data(data)
                if not data:
                    return None
                continue
            if isinstance(event, c.ClientFlags):
                continue
            options += 1
            if options > MAX_OPTIONS:
                raise c.ProtocolError("too many options during negotiation")
            export = self._answer_option(event)
            if export is not None:
                self.sock.settimeout(None)
                self._pending = self.codec.take_all_buffered()
                return export
            if self.codec.state is c.State.CLOSED:
                return None

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self.sock.sendall(self.codec.encode_option_reply(option, reply, data))

    def _refuse(self, option: int, reply: int, message: str) -> None:
        log.info("option refused", extra={"peer": self.peer, "option": option, "why": message})
        self._reply(option, reply, c.limit_text(message))

    def _answer_option(self, event: c.Event) -> Export | None:
        device = self.server.device
        if isinstance(event, c.ExportNameOption):
            export = self.server.resolve(device, event.name)
            if export is None:
                raise c.ProtocolError(f"unknown export {event.name!r} in NBD_OPT_EXPORT_NAME")
            flags = c.export_flags(export.read_only, self.codec.structured_replies)
            self.sock.sendall(self.codec.encode_export_name_reply(export.size, flags))
            return self._enter(export)
        if isinstance(event, c.GoOption):
            opt = Opt.GO if event.go else Opt.INFO
            export = self.server.resolve(device, event.name)
            if export is None:
                self._refuse(opt, Rep.ERR_UNKNOWN, f"no export named {event.name!r}")
                return None
            flags = c.export_flags(export.read_only, self.codec.structured_replies)
            self._reply(opt, Rep.INFO, c.encode_info_export(export.size, flags))
            if Info.NAME in event.requests:
                self._reply(opt, Rep.INFO, c.encode_info_name(export.name))
            if Info.DESCRIPTION in event.requests:
                self._reply(opt, Rep.INFO, c.encode_info_description(export.description))
            self._reply(
                opt, Rep.INFO, c.encode_info_block_size(MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD)
            )
            self._reply(opt, Rep.ACK)
            return self._enter(export) if event.go else None
        if isinstance(event, c.ListOption):
            for name, description in list_exports(device):
                self._reply(Opt.LIST, Rep.SERVER, c.encode_server_entry(name, description))
            self._reply(Opt.LIST, Rep.ACK)
            return None
        if isinstance(event, c.AbortOption):
            self._reply(Opt.ABORT, Rep.ACK)
            return None
        if isinstance(event, c.StructuredReplyOption):
            self._reply(Opt.STRUCTURED_REPLY, Rep.ACK)
            return None
        if isinstance(event, c.MetaContextOption):
            self._answer_meta_context(event)
            return None
        if isinstance(event, c.StartTlsOption):
            self._start_tls()
            return None
        if isinstance(event, c.RefusedOption):
            self._refuse(event.option, event.reply, event.reason)
            return None
        if isinstance(event, c.InvalidOption):
            self._refuse(event.option, Rep.ERR_INVALID, event.reason)
            return None
        if isinstance(event, c.UnsupportedOption):
            self._refuse(event.option, Rep.ERR_UNSUP, f"option {event.option} is not supported")
            return None
        raise c.ProtocolError(f"unexpected event {event!r}")

    def _start_tls(self) -> None:
        self._reply(Opt.STARTTLS, Rep.ACK)
        self.codec.start_tls()
        # Meta contexts chosen in plain text do not survive the upgrade (the spec).
        self._contexts = {}
        self._context_export = None
        assert self.server.tls is not None
        # Not ssl.SSLSocket: its reads and writes may not run on several threads at once.
        stream = TlsStream(self.sock, self.server.tls, server_side=True)
        try:
            stream.do_handshake()  # the socket's negotiation timeout bounds it too
        except OSError as exc:  # ssl.SSLError is one
            raise c.ProtocolError(f"TLS handshake failed: {exc}") from None
        self.sock = stream

    def _answer_meta_context(self, event: c.MetaContextOption) -> None:
        opt = Opt.SET_META_CONTEXT if event.set else Opt.LIST_META_CONTEXT
        if event.set:  # a SET replaces earlier choices, even when it fails
            self._contexts = {}
            self._context_export = None
        if not self.codec.structured_replies:
            self._refuse(opt, Rep.ERR_INVALID, "meta contexts need structured replies first")
            return
        export = self.server.resolve(self.server.device, event.export)
        if export is None:
            self._refuse(opt, Rep.ERR_UNKNOWN, f"no export named {event.export!r}")
            return
        if event.set and not event.queries:
            names: list[str] = []
        else:
            names = match_contexts(export, event.queries)
        if event.set:
            self._contexts = {i + 1: name for i, name in enumerate(names)}
            self._context_export = event.export
        for i, name in enumerate(names):
            self._reply(opt, Rep.META_CONTEXT, c.encode_meta_context(i + 1 if event.set else 0,
                                                                     name))
        self._reply(opt, Rep.ACK)

    def _enter(self, export: Export) -> Export:
        if self._context_export != export.wire_name:
            self._contexts = {}  # contexts chosen for another export do not apply
        export.attach()
        if export.lu is not None:
            try:
                self.server.device.attach(export.lu, self)
            except MirrorpoolError:
                export.detach()
                raise
        self.writes_primary = export.writes_primary
        self._stats = self.server.io_stats.for_lu(export.name)
        if TRIGGER_CONTEXT in self._contexts.values():
            self.codec.payload_commands = frozenset({Cmd.WRITE, Cmd.TRIGGER})
        self.codec.enter_transmission()
        self.export = export
        log.info("client connected", extra={"peer": self.peer, "export": export.name,
                                             "tls": self.codec.tls_active})
        return export

    # ---------------------------------------------------------------- transmission

    def _transmit(self, export: Export) -> None:
        self.limits = c.ExportLimits(
            size=export.size,
            read_only=export.read_only,
            max_payload=MAX_PAYLOAD,
            structured_replies=self.codec.structured_replies,
            extra_commands=frozenset({Cmd.TRIGGER})
            if TRIGGER_CONTEXT in self._contexts.values() else frozenset(),
        )
        self._pool: ThreadPoolExecutor | None = None
        poll = self.server.poll
        self._recv_sleeping = self.sock.recv_into
        self._recv_polled = self._recv_sleeping
        if poll is not None and poll.enabled and isinstance(self.sock, socket.socket):
            self._recv_polled = PolledReceiver(poll, self.sock).recv_into
        # While helpers serve slow requests, the reader does not poll: it would
        # only take the interpreter and a CPU from them.
        self._helpers_busy = 0
        self._busy_lock = threading.Lock()
        try:
            self._read_loop()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)  # requests in flight are answered first
            if export.lu is not None:
                self.server.device.detach(export.lu, self)
            export.detach()
            log.info("client disconnected", extra={"peer": self.peer, "export": export.name})

    def _recv_exact(self, view: memoryview) -> None:
        if self._pending:
            n = min(len(self._pending), len(view))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            view = view[n:]
        while view:
            n = self._receive(view)
            if n == 0:
                raise _PeerClosed("peer closed the connection")
            view = view[n:]

    def _receive(self, view: memoryview) -> int:
        if self._helpers_busy:
            return self._recv_sleeping(view)
        return self._recv_polled(view)

    def _read_loop(self) -> None:
        """Read requests in order; serve quick ones here, hand slow ones to helpers.

        Serving page-cache reads and writes in the reading thread avoids a
        thread switch per request, the costliest thing in this data path.
        Requests are read in batches (one recv may bring many pipelined ones,
        WRITE payloads are used where they landed) and their replies leave
        together just before the thread would wait for more.  Requests that
        may block (flush, triggers, block status, very large transfers) go to
        a small per-connection pool, so later requests are not held up.
        """
        rbuf = bytearray(READ_BUFFER)
        rview = memoryview(rbuf)
        start = 0
        end = len(self._pending)
        rview[:end] = self._pending
        self._pending = b""
        buf = _take_buffer()  # read replies and large payloads, in request order
        view = memoryview(buf)
        used = 0  # bytes of ``view`` holding replies not yet sent
        out: list[bytes | memoryview] = []
        codec = self.codec
        receive = self._receive
        header_size = c.REQUEST_HEADER_SIZE

        def flush() -> None:
            nonlocal used
            if out:
                self._send(*out)
                out.clear()
            used = 0

        def fill(need: int) -> None:
            """Make at least ``need`` bytes available at rbuf[start:end]."""
            nonlocal start, end
            if start:
                rview[: end - start] = rview[start:end]
                end -= start
                start = 0
            while end < need:
                if out:
                    flush()  # about to wait: let the replies go first
                n = receive(rview[end:])
                if n == 0:
                    raise _PeerClosed("peer closed the connection")
                end += n

        # Mutations admitted ahead, waiting to be carried out in order.  Their
        # payloads are views of rview, so they are served before any fill().
        ahead: list[tuple[c.Command, memoryview, tuple[Errno, str], object]] = []

        def serve_ahead() -> None:
            while ahead:
                self._serve(*ahead.pop(0), out)

        try:
            while not self._closing:
                if ahead and (len(ahead) >= MAX_AHEAD
                              or not _whole_mutation(rview, start, end)):
                    serve_ahead()
                    if len(out) > 256:
                        flush()
                try:
                    if end - start < header_size:
                        fill(header_size)
                    cmd = codec.decode_command(rview[start : start + header_size])
                    start += header_size
                    slow = _is_slow(cmd) or (cmd.type == Cmd.WRITE
                                             and cmd.length >= SLOW_COPIED_WRITE
                                             and self.export.writes_copied)
                    spare = None
                    n = cmd.payload_length
                    payload = view
                    buffered = n == 0  # the payload is a view of rview
                    if n:
                        if n > MAX_PAYLOAD:
                            self._drain_buffered(cmd.payload_length, rview, start, end)
                            start = end = 0
                        else:
                            if slow:
                                spare = _take_buffer()
                                dst = memoryview(spare)
                            elif end - start >= n:
                                dst = None  # the payload is already here
                            else:
                                if used + n > MAX_PAYLOAD:
                                    flush()
                                dst = view[used:]
                            if dst is None:
                                payload = rview[start : start + n]
                                start += n
                                buffered = True
                            else:
                                have = min(end - start, n)
                                dst[:have] = rview[start : start + have]
                                start += have
                                if have < n:
                                    self._recv_exact(dst[have:n])
                                payload = dst
                            codec.payload_consumed(n)
                except (_PeerClosed, OSError, c.ProtocolError):
                    self._close_transmission()
                    raise
                if cmd.type == Cmd.DISC:
                    self._closing = True
                    return
                verdict = c.check_command(cmd, self.limits)
                # the next request is a whole mutation as well: admit this one ahead
                defer = buffered and not slow and cmd.type in _AHEAD and \
                    self.export.admits_ahead and _whole_mutation(rview, start, end)
                if not defer:
                    serve_ahead()  # before this one is admitted: if it fails, nothing is
                ticket = None
                if not verdict[0] and cmd.type in _ADMITTED:
                    # Sequence numbers are given here, in the order requests arrived.
                    try:
                        ticket = self.export.admit(cmd, payload[:n])
                    except (MirrorpoolError, StoreError) as exc:
                        verdict = (error_code(exc), str(exc))
                if defer:
                    ahead.append((cmd, payload[:n], verdict, ticket))
                    continue
                if slow:
                    if spare is None and cmd.type == Cmd.READ:
                        spare = _take_buffer()
                        payload = memoryview(spare)
                    with self._busy_lock:
                        self._helpers_busy += 1
                    self._helpers().submit(self._serve_then_release, cmd, payload, verdict,
                                           ticket, spare)
                    continue
                if cmd.type == Cmd.READ:
                    if used + cmd.length > MAX_PAYLOAD:
                        flush()
                    payload = view[used:]
                    used += cmd.length
                self._serve(cmd, payload, verdict, ticket, out)
                if len(out) > 256:
                    flush()
            serve_ahead()
            flush()
        finally:
            try:
                # Admitted, so carried out even if the peer went away (as a helper's are),
                # each on its own: one that fails must not leave the others' sequencer
                # operations unfinished, which would hold back every later one.
                while ahead:
                    try:
                        self._serve(*ahead.pop(0), out)
                    except Exception:
                        log.exception("request failed", extra={"peer": self.peer})
                with contextlib.suppress(OSError):
                    flush()
            finally:
                _give_buffer(buf)

    def _drain_buffered(self, n: int, rview: memoryview, start: int, end: int) -> None:
        """Skip an oversized WRITE payload, part of which may already be buffered."""
        have = min(end - start, n)
        self.codec.payload_consumed(have)
        self._drain(n - have)

    def _helpers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=max(1, self.server.workers_per_connection - 1),
                thread_name_prefix=f"nbd-{self.peer}",
            )
        return self._pool

    def _serve_then_release(self, cmd: c.Command, view: memoryview,
                            verdict: tuple[Errno, str], ticket: object,
                            spare: mmap.mmap | None) -> None:
        try:
            self._serve(cmd, view, verdict, ticket)
        except OSError:
            pass  # the peer went away; the reader reports it
        except Exception:
            log.exception("request failed", extra={"peer": self.peer})
        finally:
            if spare is not None:
                _give_buffer(spare)
            with self._busy_lock:
                self._helpers_busy -= 1

    def _close_transmission(self) -> None:
        self._closing = True
        self._shutdown(socket.SHUT_RD)

    def _drain(self, n: int) -> None:
        if n > MAX_DRAIN:
            raise c.ProtocolError(f"write payload of {n} bytes is far over the maximum")
        scratch = memoryview(bytearray(_DRAIN_CHUNK))
        while n:
            take = min(n, _DRAIN_CHUNK)
            self._recv_exact(scratch[:take])
            self.codec.payload_consumed(take)
            n -= take

    def _respond(self, out: list[bytes | memoryview] | None, *parts: bytes | memoryview) -> None:
        if out is None:
            self._send(*parts)
        else:
            out.extend(parts)

    def _send(self, *parts: bytes | memoryview) -> None:
        with self._send_lock:
            sent = self.sock.sendmsg(parts)  # TlsStream's sends everything
            total = sum(len(p) for p in parts)
            if sent < total:
                rest = b"".join(bytes(p) for p in parts)[sent:]
                self.sock.sendall(rest)

    def _serve(
        self, cmd: c.Command, view: memoryview, verdict: tuple[Errno, str], ticket: object,
        out: list[bytes | memoryview] | None = None,
    ) -> None:
        """Serve one request; its reply goes to ``out`` if given, else straight out."""
        started = time.monotonic()
        ok = self._execute(cmd, view, verdict, ticket, out)
        stats = self._stats.get(_OP_NAMES.get(cmd.type, "other"))
        if stats is not None:
            moved = cmd.length if cmd.type in (Cmd.READ, Cmd.WRITE) else 0
            stats.observe(time.monotonic() - started, moved, not ok)

    def _execute(
        self, cmd: c.Command, view: memoryview, verdict: tuple[Errno, str], ticket: object,
        out: list[bytes | memoryview] | None,
    ) -> bool:
        """Carry out one request and send its reply; False if the reply was an error."""
        structured = self.limits.structured_replies
        code, why = verdict
        if code:
            log.info("request refused", extra={"peer": self.peer, "cmd": cmd.type, "why": why})
            self._respond(out, c.encode_error_reply(cmd.cookie, code, structured and cmd.type in
                                                    (Cmd.READ, Cmd.BLOCK_STATUS, Cmd.TRIGGER),
                                                    why))
            return False
        export = self.export
        assert export is not None
        typ = cmd.type
        try:
            if typ == Cmd.READ:
                if cmd.length == 0:  # nothing to read; a data chunk may not be empty
                    self._respond(out, c.encode_done(cmd.cookie) if structured
                               else c.encode_simple_reply(cmd.cookie))
                    return True
                data = view[: cmd.length]
                export.read_into(data, cmd.offset)
                if structured:
                    header = c.encode_offset_data_header(cmd.cookie, cmd.offset, cmd.length)
                    self._respond(out, header, data)
                else:
                    self._respond(out, c.encode_simple_reply(cmd.cookie), data)
                return True
            if typ == Cmd.WRITE:
                export.write(ticket, view[: cmd.length], cmd.offset, bool(cmd.flags & _FUA))
            elif typ == Cmd.FLUSH:
                export.flush()
            elif typ == Cmd.TRIM:
                export.trim(ticket, cmd)
            elif typ == Cmd.WRITE_ZEROES:
                export.zero(ticket, cmd)
            elif typ == Cmd.CACHE:
                export.cache(cmd.offset, cmd.length)
            elif typ == Cmd.BLOCK_STATUS:
                return self._block_status(cmd, out)
            elif typ == Cmd.TRIGGER:
                answer = json.dumps(export.trigger(ticket)).encode()
                header = c.encode_chunk_header(cmd.cookie, REPLY_TYPE_TRIGGER, len(answer))
                self._respond(out, header, answer)
                return True
            self._respond(out, c.encode_simple_reply(cmd.cookie))
            return True
        except FastZeroUnsupported as exc:
            self._respond(out, c.encode_simple_reply(cmd.cookie, exc.code))
        except (StoreError, MirrorpoolError) as exc:
            code = error_code(exc)
            log.error("request failed", extra={"peer": self.peer, "cmd": typ, "error": str(exc)})
            self._respond(out, c.encode_error_reply(cmd.cookie, code, structured and typ in
                                            (Cmd.READ, Cmd.BLOCK_STATUS, Cmd.TRIGGER), str(exc)))
        return False

    def _block_status(self, cmd: c.Command, out: list[bytes | memoryview] | None) -> bool:
        export = self.export
        assert export is not None
        chunks: list[bytes] = []
        for context_id, name in self._contexts.items():
            source = export.contexts.get(name)
            if source is None:
                continue  # e.g. mirrorpool:trigger, which marks a capability, not data
            limit = 1 if cmd.flags & CmdFlag.REQ_ONE else MAX_EXTENTS
            extents = source(cmd.offset, cmd.length, limit)[:limit]
            runs = [(e.length, int(e.flags)) for e in extents]
            chunks.append(c.encode_block_status(cmd.cookie, context_id, runs))
        if not chunks:
            self._respond(out, c.encode_error_chunk(cmd.cookie, Errno.EINVAL,
                                            "no queryable meta context selected"))
            return False
        self._respond(out, *chunks, c.encode_done(cmd.cookie))
        return True


__all__ = ["ListenError", "NbdServer"]
