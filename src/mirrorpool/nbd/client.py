"""A small blocking NBD client: what the CLI and device links need, and the TRIGGER extension.

Requests are sent one at a time and answered in order, which is enough for
copying and triggering.  It speaks fixed newstyle with NBD_OPT_GO, structured
replies and meta contexts, and TLS (NBD_OPT_STARTTLS) for nbds:// URIs.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlparse

from mirrorpool.nbd.codec import (
    OPTION_REPLY,
    REQUEST_HEADER,
    SIMPLE_REPLY,
    STRUCTURED_HEADER,
)
from mirrorpool.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    TRIGGER_CONTEXT,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    Opt,
    Rep,
    ReplyType,
)
from mirrorpool.nbd.tls import TlsSetupError, client_tls_context, client_tls_context_from_dir

REPLY_TYPE_TRIGGER = 0x4D50
# A pipeline's wait gathers at most this many replies: the link timeout then covers
# the progress of a few requests, not of a whole window.
RCVLOWAT_REPLIES = 32


class NbdError(Exception):
    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Address:
    host: str | None
    port: int
    socket_path: str | None
    export: str
    tls: bool = False
    # libnbd's ?tls-certificates=DIR: ca-cert.pem, client-cert.pem, client-key.pem
    tls_certificates: str | None = None


def parse_uri(uri: str) -> Address:
    """nbd[s]://HOST[:PORT]/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH; nbds: TLS required."""
    parsed = urlparse(uri)
    export = unquote(parsed.path[1:]) if parsed.path.startswith("/") else unquote(parsed.path)
    query = parse_qs(parsed.query)
    scheme, tls = parsed.scheme, parsed.scheme.startswith("nbds")
    certificates = query.get("tls-certificates", [None])[0]
    if scheme in ("nbd", "nbds"):
        return Address(parsed.hostname or "127.0.0.1", parsed.port or 10809, None, export, tls,
                       certificates)
    if scheme in ("nbd+unix", "nbds+unix"):
        path = query.get("socket", [None])[0]
        if not path:
            raise NbdError(f"{uri}: {scheme} needs ?socket=PATH")
        return Address(None, 0, path, export, tls, certificates)
    raise NbdError(f"{uri}: not an nbd://, nbds://, nbd+unix:// or nbds+unix:// URI")


class NbdClient:
    def __init__(self, uri: str, contexts: tuple[str, ...] = (), timeout: float = 60,
                 tls: ssl.SSLContext | None = None) -> None:
        """Connect and negotiate.  TLS is used, and required, with an nbds URI or a
        ``tls`` context; without a context one is made from the URI's
        ?tls-certificates=DIR, else the system's CAs verify the server."""
        addr = parse_uri(uri)
        if addr.tls and tls is None:
            try:
                tls = (client_tls_context_from_dir(addr.tls_certificates)
                       if addr.tls_certificates else client_tls_context())
            except TlsSetupError as exc:
                raise NbdError(f"{uri}: {exc}") from None
        if addr.socket_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(addr.socket_path)
        else:
            self.sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = self.sock.makefile("rb", buffering=1 << 16)
        self._tcp = self.sock.family in (socket.AF_INET, socket.AF_INET6)
        self.export = addr.export
        self.contexts: dict[int, str] = {}
        self._cookie = 0
        self.tls_active = False
        try:
            self._handshake(contexts, tls, addr.host or "localhost")
        except BaseException as exc:
            self._reader.close()
            self.sock.close()
            if isinstance(exc, ssl.SSLError):  # e.g. our certificate refused after the handshake
                raise NbdError(f"TLS: {exc}") from None
            raise

    # ------------------------------------------------------------ handshake

    def _recv(self, n: int) -> bytes:
        # buffered: a reply header is several small reads, one system call in all
        try:
            data = self._reader.read(n)
        except ssl.SSLError as exc:
            # TLS 1.3 servers refuse a client certificate after the handshake, here
            raise NbdError(f"TLS: {exc}") from None
        if len(data) < n:
            raise NbdError("server closed the connection")
        return data

    def _option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, reply, length = OPTION_REPLY.unpack(self._recv(OPTION_REPLY.size))
        if magic != OPTION_REPLY_MAGIC or opt != option:
            raise NbdError("bad option reply from server")
        return reply, self._recv(length)

    def _handshake(self, contexts: tuple[str, ...], tls: ssl.SSLContext | None,
                   host: str) -> None:
        magic, ihaveopt, _flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or ihaveopt != IHAVEOPT:
            raise NbdError("not an NBD newstyle server")
        self.sock.sendall(struct.pack(">I", ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
        if tls is not None:
            self._start_tls(tls, host)
        self._option(Opt.STRUCTURED_REPLY)
        reply, _ = self._option_reply(Opt.STRUCTURED_REPLY)
        self.structured = reply == Rep.ACK
        name = self.export.encode()
        if contexts and self.structured:
            body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
            for ctx in contexts:
                body += struct.pack(">I", len(ctx)) + ctx.encode()
            self._option(Opt.SET_META_CONTEXT, body)
            while True:
                reply, data = self._option_reply(Opt.SET_META_CONTEXT)
                if reply == Rep.META_CONTEXT:
                    (ctx_id,) = struct.unpack(">I", data[:4])
                    self.contexts[ctx_id] = data[4:].decode()
                elif reply == Rep.ACK:
                    break
                else:
                    raise NbdError(
                        f"server refused meta contexts: {data.decode(errors='replace')}", reply)
        self._option(Opt.GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1,
                                                                                 Info.BLOCK_SIZE))
        while True:
            reply, data = self._option_reply(Opt.GO)
            if reply == Rep.ACK:
                break
            if reply == Rep.INFO:
                (info,) = struct.unpack(">H", data[:2])
                if info == Info.EXPORT:
                    self.size, self.flags = struct.unpack(">QH", data[2:12])
                continue
            raise NbdError(
                f"export {self.export!r}: {data.decode(errors='replace') or 'refused'}", reply
            )

    def _start_tls(self, tls: ssl.SSLContext, host: str) -> None:
        # First of all options, so that none of them travels in plain text.
        self._option(Opt.STARTTLS)
        reply, data = self._option_reply(Opt.STARTTLS)
        if reply != Rep.ACK:
            # No fallback to plain text: that is what a downgrade attack would want.
            why = data.decode(errors="replace") or f"reply 0x{reply:x}"
            raise NbdError(f"server refused TLS: {why}", reply)
        # The server sends nothing between its ACK and our ClientHello, so the
        # buffered reader holds nothing that would be lost with it.
        self._reader.close()
        try:
            self.sock = tls.wrap_socket(self.sock, server_hostname=host)
        except ssl.SSLError as exc:  # certificate checks included
            raise NbdError(f"TLS handshake with {host} failed: {exc}") from None
        self._reader = self.sock.makefile("rb", buffering=1 << 16)
        self.tls_active = True

    @property
    def can_trigger(self) -> bool:
        return TRIGGER_CONTEXT in self.contexts.values()

    # ------------------------------------------------------------ transmission

    def _request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                 payload: bytes | memoryview = b"") -> int:
        self._cookie += 1
        header = REQUEST_HEADER.pack(REQUEST_MAGIC, flags, cmd, self._cookie, offset, length)
        self.sock.sendall(header)
        if payload:
            self.sock.sendall(payload)
        return self._cookie

    # ------------------------------------------------------------ pipelining

    def encode_request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                       payload: bytes | memoryview = b"") -> tuple[int, list[bytes | memoryview]]:
        """A request as buffers to send later (many at once); returns its cookie too."""
        self._cookie += 1
        header = REQUEST_HEADER.pack(REQUEST_MAGIC, flags, cmd, self._cookie, offset, length)
        return self._cookie, [header, payload] if payload else [header]

    def send_buffers(self, buffers: list[bytes | memoryview]) -> None:
        self.sock.sendall(b"".join(buffers))

    def next_reply(self) -> tuple[int, int, str, list[tuple[int, bytes]]]:
        """The next whole reply, whichever request it answers (no data-carrying commands).

        Returns (cookie, error, error message, other chunks); an error reply does not raise.
        """
        chunks: list[tuple[int, bytes]] = []
        error, message = 0, ""
        while True:
            (magic,) = struct.unpack(">I", self._recv(4))
            if magic == SIMPLE_REPLY_MAGIC:
                error, cookie = struct.unpack(">IQ", self._recv(SIMPLE_REPLY.size - 4))
                return cookie, error, message, chunks
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NbdError(f"bad reply magic 0x{magic:x}")
            flags, typ, cookie, length = struct.unpack(
                ">HHQI", self._recv(STRUCTURED_HEADER.size - 4))
            body = self._recv(length)
            if typ & (1 << 15):
                error, mlen = struct.unpack(">IH", body[:6])
                message = body[6 : 6 + mlen].decode(errors="replace")
            elif typ != ReplyType.NONE:
                chunks.append((typ, body))
            if flags & 1:
                return cookie, error, message, chunks

    def next_replies(self, outstanding: int = 1) -> list[tuple[int, int, str,
                                                             list[tuple[int, bytes]]]]:
        """Every whole simple reply already received, else the next reply of any kind.

        For pipelines: one call takes what a burst of replies brought in, instead of
        several reads per reply.  Each is (cookie, error, error message, other chunks).
        With ``outstanding`` replies due on plain TCP, the wait lasts until nearly all of
        them (up to RCVLOWAT_REPLIES) are here, not one wake-up each: every reply is
        at least SIMPLE_REPLY.size bytes, so the kernel never waits for more than is due.
        """
        lowat = SIMPLE_REPLY.size * (min(outstanding, RCVLOWAT_REPLIES) - 1) + 1
        try:
            # Not over TLS: part of a record may already sit in the TLS library,
            # and the kernel would then wait for bytes that never come.
            if lowat > 1 and self._tcp and not self.tls_active:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                try:
                    data = self._reader.peek(SIMPLE_REPLY.size)
                finally:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            else:
                data = self._reader.peek(SIMPLE_REPLY.size)  # waits for a first byte
        except ssl.SSLError as exc:
            raise NbdError(f"TLS: {exc}") from None
        out: list[tuple[int, int, str, list[tuple[int, bytes]]]] = []
        pos, end = 0, len(data) - SIMPLE_REPLY.size
        while pos <= end:
            magic, error, cookie = SIMPLE_REPLY.unpack_from(data, pos)
            if magic != SIMPLE_REPLY_MAGIC:
                break  # structured, or bad: next_reply tells which
            out.append((cookie, error, "", []))
            pos += SIMPLE_REPLY.size
        if not out:
            return [self.next_reply()]
        self._reader.read(pos)  # what peek showed: no system call
        return out

    def _replies(self, cookie: int, into: memoryview | None = None,
                 base: int = 0) -> list[tuple[int, bytes]]:
        """Read the reply to ``cookie``; data chunks land in ``into``; returns other chunks."""
        chunks: list[tuple[int, bytes]] = []
        while True:
            (magic,) = struct.unpack(">I", self._recv(4))
            if magic == SIMPLE_REPLY_MAGIC:
                error, got = struct.unpack(">IQ", self._recv(SIMPLE_REPLY.size - 4))
                if got != cookie:
                    raise NbdError("reply out of order")
                if error:
                    raise NbdError(f"server error {Errno(error).name}", error)
                if into is not None:
                    into[:] = self._recv(len(into))
                return chunks
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NbdError(f"bad reply magic 0x{magic:x}")
            flags, typ, got, length = struct.unpack(">HHQI", self._recv(STRUCTURED_HEADER.size - 4))
            body = self._recv(length)
            if got != cookie:
                raise NbdError("reply out of order")
            if typ == ReplyType.OFFSET_DATA and into is not None:
                (off,) = struct.unpack(">Q", body[:8])
                into[off - base : off - base + length - 8] = body[8:]
            elif typ == ReplyType.OFFSET_HOLE and into is not None:
                off, n = struct.unpack(">QI", body[:12])
                into[off - base : off - base + n] = bytes(n)
            elif typ & (1 << 15):
                error, mlen = struct.unpack(">IH", body[:6])
                message = body[6 : 6 + mlen].decode(errors="replace")
                raise NbdError(message or f"server error {error}", error)
            elif typ != ReplyType.NONE:
                chunks.append((typ, body))
            if flags & 1:
                return chunks

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.pread_into(memoryview(buf), offset)
        return bytes(buf)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        cookie = self._request(Cmd.READ, offset, len(buf))
        self._replies(cookie, buf, offset)

    def pwrite(self, data: bytes | memoryview, offset: int, fua: bool = False) -> None:
        cookie = self._request(Cmd.WRITE, offset, len(data), CmdFlag.FUA if fua else 0, data)
        self._replies(cookie)

    def flush(self) -> None:
        self._replies(self._request(Cmd.FLUSH))

    def zero(self, length: int, offset: int, may_trim: bool = False) -> None:
        flags = 0 if may_trim else CmdFlag.NO_HOLE
        self._replies(self._request(Cmd.WRITE_ZEROES, offset, length, flags))

    def trim(self, length: int, offset: int) -> None:
        self._replies(self._request(Cmd.TRIM, offset, length))

    def block_status(self, length: int, offset: int) -> dict[str, list[tuple[int, int]]]:
        cookie = self._request(Cmd.BLOCK_STATUS, offset, length)
        out: dict[str, list[tuple[int, int]]] = {}
        for typ, body in self._replies(cookie):
            if typ == ReplyType.BLOCK_STATUS:
                (ctx,) = struct.unpack(">I", body[:4])
                runs = [struct.unpack(">II", body[i : i + 8]) for i in range(4, len(body), 8)]
                out[self.contexts.get(ctx, str(ctx))] = runs
        return out

    def trigger(self, label: str = "") -> dict:
        """The in-band TRIGGER: ordered after every write this connection sent before it."""
        if not self.can_trigger:
            raise NbdError(f"the server did not agree to {TRIGGER_CONTEXT}")
        return self.trigger_raw(label.encode())

    def trigger_raw(self, payload: bytes) -> dict:
        """The in-band TRIGGER with a payload as is (a label, or a forwarded trigger)."""
        if not self.can_trigger:
            raise NbdError(f"the server did not agree to {TRIGGER_CONTEXT}")
        cookie = self._request(Cmd.TRIGGER, 0, len(payload), 0, payload)
        for typ, body in self._replies(cookie):
            if typ == REPLY_TYPE_TRIGGER:
                return json.loads(body)
        raise NbdError("trigger answered without a generation")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._request(Cmd.DISC)
        self.abort()

    def abort(self) -> None:
        """Drop the connection without a word (the reader holds the socket open too)."""
        self._reader.close()
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
