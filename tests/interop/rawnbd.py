"""A tiny hand-rolled NBD client for poking a server with raw, possibly wrong, bytes.

Deliberately independent of ``mirrorpool.nbd``: every number and layout here is
written from the spec (NetworkBlockDevice/nbd doc/proto.md), so a mistake in the
server's codec cannot cancel out against the same mistake in the client.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
C_FIXED_NEWSTYLE = 1
C_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_UNKNOWN = 2**31 + 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1
CMD_FLAG_NO_HOLE = 2
CMD_FLAG_DF = 4
CMD_FLAG_REQ_ONE = 8

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 2**15 + 1
REPLY_TYPE_ERROR_OFFSET = 2**15 + 2

EPERM = 1
EIO = 5
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75

DEFAULT_TIMEOUT = 10.0


class Closed(Exception):
    """The server closed the connection while we expected more bytes."""


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def nbd_string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return u32(len(raw)) + raw


def go_data(name: str | bytes, *requests: int) -> bytes:
    """Payload of NBD_OPT_GO / NBD_OPT_INFO."""
    return nbd_string(name) + struct.pack(f">H{len(requests)}H", len(requests), *requests)


def meta_context_data(export: str | bytes, *queries: str | bytes) -> bytes:
    """Payload of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT."""
    return nbd_string(export) + u32(len(queries)) + b"".join(nbd_string(q) for q in queries)


@dataclass
class OptionReply:
    option: int
    type: int
    data: bytes


@dataclass
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes

    @property
    def done(self) -> bool:
        return bool(self.flags & REPLY_FLAG_DONE)

    def error(self) -> tuple[int, str]:
        """(error, message) of an error chunk."""
        assert self.type & 0x8000, f"chunk type {self.type} is not an error chunk"
        err, n = struct.unpack(">IH", self.payload[:6])
        return err, self.payload[6 : 6 + n].decode(errors="replace")


class RawNbd:
    """One TCP connection speaking NBD by hand."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.handshake_flags = 0
        self.size = 0
        self.transmission_flags = 0
        self._cookie = 0

    # ------------------------------------------------------------ plumbing

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawNbd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError as exc:
                raise Closed(f"reset after {len(buf)} of {n} bytes") from exc
            if not chunk:
                raise Closed(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def read_until_closed(self, timeout: float = 5.0) -> bytes | None:
        """Everything the server sends before it closes the connection (EOF or reset),
        or None if it is still open after ``timeout`` seconds of silence."""
        self.sock.settimeout(timeout)
        got = bytearray()
        try:
            while True:
                try:
                    chunk = self.sock.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    return bytes(got)
                if not chunk:
                    return bytes(got)
                got += chunk
        except TimeoutError:
            return None
        finally:
            self.sock.settimeout(DEFAULT_TIMEOUT)

    def is_closed_by_peer(self, timeout: float = 5.0) -> bool:
        return self.read_until_closed(timeout) is not None

    # ------------------------------------------------------------ handshake

    def read_greeting(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC, hex(magic)
        assert opt_magic == IHAVEOPT, hex(opt_magic)
        self.handshake_flags = flags
        return flags

    def send_client_flags(self, flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> None:
        self.send(u32(flags))

    def start(self, flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> RawNbd:
        """Greeting and client flags: ready for options."""
        self.read_greeting()
        self.send_client_flags(flags)
        return self

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def read_option_reply(self) -> OptionReply:
        magic, option, typ, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, hex(magic)
        return OptionReply(option, typ, self.recv_exact(length))

    def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option; all its replies up to and including the final one."""
        self.send_option(option, data)
        replies = []
        while True:
            reply = self.read_option_reply()
            assert reply.option == option, (reply.option, option)
            replies.append(reply)
            if reply.type == REP_ACK or reply.type & 0x8000_0000:
                return replies

    def go(self, name: str | bytes, *requests: int) -> list[OptionReply]:
        """NBD_OPT_GO; on success remember size and flags."""
        replies = self.option(OPT_GO, go_data(name, *requests))
        if replies[-1].type == REP_ACK:
            for r in replies:
                if r.type == REP_INFO and struct.unpack(">H", r.data[:2])[0] == INFO_EXPORT:
                    _, self.size, self.transmission_flags = struct.unpack(">HQH", r.data)
        return replies

    def structured_reply(self) -> None:
        [reply] = self.option(OPT_STRUCTURED_REPLY)
        assert reply.type == REP_ACK, reply

    def set_meta_context(self, export: str, *queries: str) -> dict[int, str]:
        replies = self.option(OPT_SET_META_CONTEXT, meta_context_data(export, *queries))
        assert replies[-1].type == REP_ACK, replies[-1]
        return {
            struct.unpack(">I", r.data[:4])[0]: r.data[4:].decode()
            for r in replies
            if r.type == REP_META_CONTEXT
        }

    # ------------------------------------------------------------ transmission

    def next_cookie(self) -> int:
        self._cookie += 1
        return 0xC0_0C1E_0000 + self._cookie

    def send_request(
        self,
        typ: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        cookie: int | None = None,
        data: bytes = b"",
        magic: int = REQUEST_MAGIC,
    ) -> int:
        cookie = self.next_cookie() if cookie is None else cookie
        self.send(struct.pack(">IHHQQI", magic, flags, typ, cookie, offset, length) + data)
        return cookie

    def read_simple_reply(self, cookie: int | None = None) -> int:
        """The error field of a simple reply (its data, if any, is left unread)."""
        magic, error, got = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, f"expected a simple reply, got magic {magic:#x}"
        if cookie is not None:
            assert got == cookie, (got, cookie)
        return error

    def read_chunk(self, cookie: int | None = None) -> Chunk:
        magic, flags, typ, got, length = struct.unpack(">IHHQI", self.recv_exact(20))
        assert magic == STRUCTURED_REPLY_MAGIC, f"expected a chunk, got magic {magic:#x}"
        if cookie is not None:
            assert got == cookie, (got, cookie)
        return Chunk(flags, typ, got, self.recv_exact(length))

    def read_chunks(self, cookie: int | None = None) -> list[Chunk]:
        chunks = [self.read_chunk(cookie)]
        while not chunks[-1].done:
            chunks.append(self.read_chunk(cookie))
        return chunks

    # Simple-reply conveniences (no structured replies negotiated).

    def read(self, offset: int, length: int, flags: int = 0) -> tuple[int, bytes]:
        cookie = self.send_request(CMD_READ, offset, length, flags)
        error = self.read_simple_reply(cookie)
        return error, (self.recv_exact(length) if error == 0 else b"")

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        cookie = self.send_request(CMD_WRITE, offset, len(data), flags, data=data)
        return self.read_simple_reply(cookie)

    def command(self, typ: int, offset: int = 0, length: int = 0, flags: int = 0) -> int:
        """A request without payload either way; its simple reply's error."""
        cookie = self.send_request(typ, offset, length, flags)
        return self.read_simple_reply(cookie)

    def disconnect(self) -> None:
        self.send_request(CMD_DISC)
        self.close()


def open_export(port: int, name: str, structured: bool = False,
                contexts: tuple[str, ...] = ()) -> RawNbd:
    """A connection in transmission on ``name``; raises if negotiation fails."""
    conn = RawNbd(port).start()
    try:
        if structured:
            conn.structured_reply()
        if contexts:
            conn.set_meta_context(name, *contexts)
        replies = conn.go(name, INFO_BLOCK_SIZE)
        assert replies[-1].type == REP_ACK, replies[-1]
    except BaseException:
        conn.close()
        raise
    return conn
