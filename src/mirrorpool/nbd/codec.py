"""Sans-IO NBD server codec: bytes in, events out, bytes to send back.

The codec never touches a socket.  The I/O layer feeds it what it received
(``receive_data``) and asks for the next event (``next_event``); it answers
with the ``encode_*`` helpers.  In transmission the I/O layer may read the
fixed-size request header itself and hand it to ``decode_command``, and read a
WRITE payload straight into its own buffer, then tell the codec with
``payload_consumed``; this keeps the data path free of copies.

All state changes go through ``_TRANSITIONS``: a table of which event may
move the connection from which state to which.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum, auto

from mirrorpool.nbd.constants import (
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_STRING_LENGTH,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)

REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
REQUEST_HEADER_SIZE = REQUEST_HEADER.size  # 28
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length


class ProtocolError(Exception):
    """The peer broke the protocol so badly that the connection must close."""


class State(Enum):
    CLIENT_FLAGS = auto()
    OPTIONS = auto()
    TRANSMISSION = auto()
    PAYLOAD = auto()
    CLOSED = auto()


class _Need:
    """Sentinel event: feed more bytes before asking again."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _Need()


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ClientFlags:
    flags: ClientFlag


@dataclass(frozen=True, slots=True)
class ExportNameOption:
    name: str


@dataclass(frozen=True, slots=True)
class GoOption:
    """NBD_OPT_GO (go=True) or NBD_OPT_INFO (go=False)."""

    name: str
    requests: tuple[int, ...]
    go: bool


@dataclass(frozen=True, slots=True)
class ListOption:
    pass


@dataclass(frozen=True, slots=True)
class AbortOption:
    pass


@dataclass(frozen=True, slots=True)
class StructuredReplyOption:
    pass


@dataclass(frozen=True, slots=True)
class MetaContextOption:
    """NBD_OPT_SET_META_CONTEXT (set=True) or NBD_OPT_LIST_META_CONTEXT."""

    export: str
    queries: tuple[str, ...]
    set: bool


@dataclass(frozen=True, slots=True)
class StartTlsOption:
    """NBD_OPT_STARTTLS the server must accept: answer ACK, then call ``start_tls``."""


@dataclass(frozen=True, slots=True)
class UnsupportedOption:
    option: int


@dataclass(frozen=True, slots=True)
class RefusedOption:
    """An option the codec turned down by TLS policy: answered with ``reply``."""

    option: int
    reply: Rep
    reason: str


@dataclass(frozen=True, slots=True)
class InvalidOption:
    """An option we know whose payload is malformed: answered ERR_INVALID."""

    option: int
    reason: str


@dataclass(slots=True)
class Command:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    # Bytes of WRITE payload that follow this header on the wire.
    payload_length: int = 0


@dataclass(frozen=True, slots=True)
class Payload:
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    pass


class TlsMode(Enum):
    """The server's TLS policy; ON and REQUIRE are the spec's SELECTIVETLS and FORCEDTLS."""

    OFF = "off"
    ON = "on"
    REQUIRE = "require"


Event = (
    ClientFlags
    | ExportNameOption
    | GoOption
    | ListOption
    | AbortOption
    | StructuredReplyOption
    | MetaContextOption
    | StartTlsOption
    | UnsupportedOption
    | RefusedOption
    | InvalidOption
    | Command
    | Payload
    | ConnectionClosed
)

class _EnterTransmission:
    """Internal step: the server accepted GO or EXPORT_NAME."""


# (state, event type) -> next state.  Anything not listed is a protocol error.
_TRANSITIONS: dict[tuple[State, type], State] = {
    (State.CLIENT_FLAGS, ClientFlags): State.OPTIONS,
    (State.OPTIONS, GoOption): State.OPTIONS,  # enter_transmission() moves on
    (State.OPTIONS, ExportNameOption): State.OPTIONS,
    (State.OPTIONS, ListOption): State.OPTIONS,
    (State.OPTIONS, StructuredReplyOption): State.OPTIONS,
    (State.OPTIONS, MetaContextOption): State.OPTIONS,
    (State.OPTIONS, StartTlsOption): State.OPTIONS,
    (State.OPTIONS, UnsupportedOption): State.OPTIONS,
    (State.OPTIONS, RefusedOption): State.OPTIONS,
    (State.OPTIONS, InvalidOption): State.OPTIONS,
    (State.OPTIONS, AbortOption): State.CLOSED,
    (State.OPTIONS, _EnterTransmission): State.TRANSMISSION,
    (State.TRANSMISSION, Command): State.TRANSMISSION,
    (State.TRANSMISSION, Payload): State.PAYLOAD,  # a WRITE header was read
    (State.PAYLOAD, Payload): State.TRANSMISSION,  # its payload is consumed
    (State.CLIENT_FLAGS, ConnectionClosed): State.CLOSED,
    (State.OPTIONS, ConnectionClosed): State.CLOSED,
    (State.TRANSMISSION, ConnectionClosed): State.CLOSED,
    (State.PAYLOAD, ConnectionClosed): State.CLOSED,
}


@dataclass
class ServerCodec:
    """One NBD server connection, from greeting to close, without I/O."""

    state: State = State.CLIENT_FLAGS
    tls: TlsMode = TlsMode.OFF
    tls_active: bool = False
    no_zeroes: bool = False
    structured_replies: bool = False
    # Commands whose length is followed by a payload (extensions may add to it).
    payload_commands: frozenset[int] = frozenset({Cmd.WRITE})
    _buffer: bytearray = field(default_factory=bytearray)
    _payload_left: int = 0

    # ------------------------------------------------------------ input

    def greeting(self) -> bytes:
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; an empty chunk means the peer closed."""
        if not data:
            self._move(ConnectionClosed)
            return
        self._buffer += data

    @property
    def payload_left(self) -> int:
        return self._payload_left

    def next_event(self) -> Event | _Need:
        if self.state is State.CLOSED:
            return ConnectionClosed()
        if self.state is State.CLIENT_FLAGS:
            return self._next_client_flags()
        if self.state is State.OPTIONS:
            return self._next_option()
        if self.state is State.TRANSMISSION:
            if len(self._buffer) < REQUEST_HEADER_SIZE:
                return NEED_DATA
            header = bytes(self._buffer[:REQUEST_HEADER_SIZE])
            del self._buffer[:REQUEST_HEADER_SIZE]
            return self.decode_command(header)
        # PAYLOAD
        if not self._buffer:
            return NEED_DATA
        take = min(len(self._buffer), self._payload_left)
        chunk = bytes(self._buffer[:take])
        del self._buffer[:take]
        self.payload_consumed(take)
        return Payload(chunk)

    def decode_command(self, header: bytes | bytearray | memoryview) -> Command:
        """Decode one 28-byte request header (the transmission fast path)."""
        if self.state is not State.TRANSMISSION:
            raise ProtocolError(f"request header received in state {self.state.name}")
        magic, flags, typ, cookie, offset, length = REQUEST_HEADER.unpack(header)
        if magic != REQUEST_MAGIC:
            self.state = State.CLOSED
            raise ProtocolError(f"bad request magic 0x{magic:08x}")
        payload = length if typ in self.payload_commands else 0
        if payload:
            self._payload_left = payload
            self._move(Payload)
        return Command(flags, typ, cookie, offset, length, payload)

    def payload_consumed(self, n: int) -> None:
        """The I/O layer read ``n`` payload bytes itself (or via Payload events)."""
        if self.state is not State.PAYLOAD or n > self._payload_left:
            raise ProtocolError("payload accounting out of step")
        self._payload_left -= n
        if self._payload_left == 0:
            self._move(Payload)

    def take_all_buffered(self) -> bytes:
        """Hand bytes received past negotiation to an I/O layer that reads on its own."""
        chunk = bytes(self._buffer)
        self._buffer.clear()
        return chunk

    # ------------------------------------------------------------ output

    def enter_transmission(self) -> None:
        if self.state is not State.OPTIONS:
            raise ProtocolError(f"cannot enter transmission from {self.state.name}")
        self._move(_EnterTransmission)

    def start_tls(self) -> None:
        """The ACK to STARTTLS is sent: from here on every byte travels inside TLS."""
        if self.state is not State.OPTIONS or self.tls is TlsMode.OFF or self.tls_active:
            raise ProtocolError("TLS cannot start here")
        if self._buffer:
            # Plain bytes sent behind STARTTLS would be read as if they came over
            # TLS: an injection, as in the STARTTLS flaws of mail servers.
            self.state = State.CLOSED
            raise ProtocolError("data sent after NBD_OPT_STARTTLS before the TLS handshake")
        self.tls_active = True
        # The spec wants nothing negotiated in plain text to survive the upgrade.
        self.structured_replies = False

    def close(self) -> None:
        self.state = State.CLOSED

    def encode_option_reply(self, option: int, reply: int, data: bytes = b"") -> bytes:
        return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data

    def encode_export_name_reply(self, size: int, flags: int) -> bytes:
        reply = struct.pack(">QH", size, flags)
        return reply if self.no_zeroes else reply + bytes(124)

    # ------------------------------------------------------------ internals

    def _move(self, event_type: type) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, event_type)]
        except KeyError:
            self.state = State.CLOSED
            raise ProtocolError(
                f"{event_type.__name__} not allowed in state {self.state.name}"
            ) from None

    def _next_client_flags(self) -> ClientFlags | _Need:
        if len(self._buffer) < 4:
            return NEED_DATA
        (raw,) = struct.unpack(">I", self._buffer[:4])
        del self._buffer[:4]
        known = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
        if raw & ~known or not raw & ClientFlag.FIXED_NEWSTYLE:
            self.state = State.CLOSED
            raise ProtocolError(f"unsupported client flags 0x{raw:08x}")
        self.no_zeroes = bool(raw & ClientFlag.NO_ZEROES)
        self._move(ClientFlags)
        return ClientFlags(ClientFlag(raw))

    def _next_option(self) -> Event | _Need:
        if len(self._buffer) < OPTION_HEADER.size:
            return NEED_DATA
        magic, option, length = OPTION_HEADER.unpack(self._buffer[: OPTION_HEADER.size])
        if magic != IHAVEOPT:
            self.state = State.CLOSED
            raise ProtocolError(f"bad option magic 0x{magic:016x}")
        if length > MAX_OPTION_LENGTH:
            self.state = State.CLOSED
            raise ProtocolError(f"option {option} length {length} exceeds {MAX_OPTION_LENGTH}")
        end = OPTION_HEADER.size + length
        if len(self._buffer) < end:
            return NEED_DATA
        data = bytes(self._buffer[OPTION_HEADER.size : end])
        del self._buffer[:end]
        try:
            event = self._tls_verdict(option, data) or _parse_option(option, data)
        except ProtocolError:
            self.state = State.CLOSED
            raise
        if isinstance(event, StructuredReplyOption):
            self.structured_replies = True
        self._move(type(event))
        return event


    def _tls_verdict(self, option: int, data: bytes) -> Event | None:
        """What TLS policy says about an option before it is parsed; None: parse it."""
        if option == Opt.STARTTLS:
            if data:
                return InvalidOption(option, "NBD_OPT_STARTTLS takes no data")
            if self.tls is TlsMode.OFF:
                return RefusedOption(option, Rep.ERR_POLICY, "TLS is not enabled on this server")
            if self.tls_active:
                return InvalidOption(option, "TLS is already active")
            return StartTlsOption()
        if self.tls is TlsMode.REQUIRE and not self.tls_active and option != Opt.ABORT:
            if option == Opt.EXPORT_NAME:  # it has no error reply: all we can do is hang up
                raise ProtocolError("NBD_OPT_EXPORT_NAME before TLS on a server that requires it")
            return RefusedOption(option, Rep.ERR_TLS_REQD,
                                 "this server requires TLS: send NBD_OPT_STARTTLS first")
        return None


# ------------------------------------------------------------ option parsing


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("option data truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def string(self) -> str:
        n = self.u32()
        if n > MAX_STRING_LENGTH:
            raise ValueError(f"string of {n} bytes is over {MAX_STRING_LENGTH}")
        raw = self.take(n)
        if b"\0" in raw:
            raise ValueError("string contains NUL")
        return raw.decode("utf-8")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError("trailing bytes in option data")


def _parse_option(option: int, data: bytes) -> Event:
    try:
        if option == Opt.EXPORT_NAME:
            if b"\0" in data or len(data) > MAX_STRING_LENGTH:
                raise ValueError("bad export name")
            return ExportNameOption(data.decode("utf-8"))
        if option in (Opt.GO, Opt.INFO):
            r = _Reader(data)
            name = r.string()
            count = r.u16()
            requests = tuple(r.u16() for _ in range(count))
            r.end()
            return GoOption(name, requests, option == Opt.GO)
        if option == Opt.LIST:
            if data:
                raise ValueError("NBD_OPT_LIST takes no data")
            return ListOption()
        if option == Opt.ABORT:
            return AbortOption()
        if option == Opt.STRUCTURED_REPLY:
            if data:
                raise ValueError("NBD_OPT_STRUCTURED_REPLY takes no data")
            return StructuredReplyOption()
        if option in (Opt.SET_META_CONTEXT, Opt.LIST_META_CONTEXT):
            r = _Reader(data)
            export = r.string()
            count = r.u32()
            if count > len(data):
                raise ValueError("query count larger than the option")
            queries = tuple(r.string() for _ in range(count))
            r.end()
            return MetaContextOption(export, queries, option == Opt.SET_META_CONTEXT)
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        if option == Opt.EXPORT_NAME:
            raise ProtocolError(f"malformed NBD_OPT_EXPORT_NAME: {exc}") from None
        return InvalidOption(option, str(exc))
    return UnsupportedOption(option)


# ------------------------------------------------------------ replies


def encode_info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", Info.EXPORT, size, flags)


def encode_info_name(name: str) -> bytes:
    return struct.pack(">H", Info.NAME) + name.encode()


def encode_info_description(text: str) -> bytes:
    return struct.pack(">H", Info.DESCRIPTION) + text.encode()


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", Info.BLOCK_SIZE, minimum, preferred, maximum)


def encode_server_entry(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + description.encode()


def encode_meta_context(context_id: int, name: str) -> bytes:
    return struct.pack(">I", context_id) + name.encode()


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def encode_chunk_header(cookie: int, reply_type: int, length: int, done: bool = True) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, length)


def encode_offset_data_header(cookie: int, offset: int, length: int) -> bytes:
    """Chunk header plus the offset; the caller sends ``length`` data bytes after it."""
    return encode_chunk_header(cookie, ReplyType.OFFSET_DATA, 8 + length) + struct.pack(
        ">Q", offset
    )


def limit_text(message: str, limit: int = MAX_STRING_LENGTH) -> bytes:
    """UTF-8 of ``message``, cut to ``limit`` bytes at a character boundary."""
    return message.encode()[:limit].decode("utf-8", errors="ignore").encode()


def encode_error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    text = limit_text(message)
    body = struct.pack(">IH", error, len(text)) + text
    return encode_chunk_header(cookie, ReplyType.ERROR, len(body)) + body


def encode_block_status(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """One BLOCK_STATUS chunk for one context; ``extents`` are (length, flags)."""
    body = struct.pack(">I", context_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return encode_chunk_header(cookie, ReplyType.BLOCK_STATUS, len(body), done=False) + body


def encode_done(cookie: int) -> bytes:
    return encode_chunk_header(cookie, ReplyType.NONE, 0)


def encode_error_reply(cookie: int, error: int, structured: bool, message: str = "") -> bytes:
    if structured:
        return encode_error_chunk(cookie, error, message)
    return encode_simple_reply(cookie, error)


# ------------------------------------------------------------ validation

# FUA is valid on every command (the server may ignore it where it means nothing).
# Plain ints: this table is consulted for every request.
_ALLOWED_FLAGS: dict[int, int] = {
    int(Cmd.READ): int(CmdFlag.FUA | CmdFlag.DF),
    int(Cmd.WRITE): int(CmdFlag.FUA),
    int(Cmd.DISC): int(CmdFlag.FUA),
    int(Cmd.FLUSH): int(CmdFlag.FUA),
    int(Cmd.TRIM): int(CmdFlag.FUA),
    int(Cmd.CACHE): int(CmdFlag.FUA),
    int(Cmd.WRITE_ZEROES): int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
    int(Cmd.BLOCK_STATUS): int(CmdFlag.FUA | CmdFlag.REQ_ONE),
}

_MUTATIONS = frozenset(int(c) for c in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES))
_RANGED = frozenset(int(c) for c in (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE,
                                     Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS))
_TRANSFERS = frozenset(int(c) for c in (Cmd.READ, Cmd.WRITE))
_ALLOCATING = frozenset(int(c) for c in (Cmd.WRITE, Cmd.WRITE_ZEROES))
_OK = (Errno.OK, "")


@dataclass(frozen=True, slots=True)
class ExportLimits:
    size: int
    read_only: bool
    max_payload: int
    structured_replies: bool
    extra_commands: frozenset[int] = frozenset()


def check_command(cmd: Command, limits: ExportLimits) -> tuple[Errno, str]:
    """The protocol's verdict on a request before any data is touched."""
    typ = cmd.type
    allowed = _ALLOWED_FLAGS.get(typ)
    if allowed is None:
        if typ in limits.extra_commands:
            return _OK
        return Errno.EINVAL, f"unknown command {typ}"
    if cmd.flags & ~allowed:
        return Errno.EINVAL, f"flags 0x{cmd.flags:x} not valid for command {Cmd(typ).name}"
    if typ == Cmd.BLOCK_STATUS:
        if not limits.structured_replies:
            return Errno.EINVAL, "block status needs structured replies"
        if cmd.length == 0:
            return Errno.EINVAL, "block status of zero length"
    if limits.read_only and typ in _MUTATIONS:
        return Errno.EPERM, "export is read-only"
    if typ in _TRANSFERS and cmd.length > limits.max_payload:
        return Errno.EOVERFLOW if typ == Cmd.READ else Errno.EINVAL, (
            f"length {cmd.length} exceeds the maximum payload {limits.max_payload}"
        )
    if typ in _RANGED and cmd.offset + cmd.length > limits.size:
        code = Errno.ENOSPC if typ in _ALLOCATING else Errno.EINVAL
        return code, f"range {cmd.offset}+{cmd.length} beyond export size {limits.size}"
    return _OK


def export_flags(read_only: bool, structured_replies: bool = True) -> int:
    flags = (
        TransmissionFlag.HAS_FLAGS
        | TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_FUA
        | TransmissionFlag.CAN_MULTI_CONN
        | TransmissionFlag.SEND_CACHE
    )
    if structured_replies:  # DF only means something with structured replies
        flags |= TransmissionFlag.SEND_DF
    if read_only:
        return flags | TransmissionFlag.READ_ONLY
    return (
        flags
        | TransmissionFlag.SEND_TRIM
        | TransmissionFlag.SEND_WRITE_ZEROES
        | TransmissionFlag.SEND_FAST_ZERO
    )


__all__ = [
    "NEED_DATA",
    "REQUEST_HEADER_SIZE",
    "AbortOption",
    "ClientFlags",
    "Command",
    "ConnectionClosed",
    "ExportLimits",
    "ExportNameOption",
    "GoOption",
    "InvalidOption",
    "ListOption",
    "MetaContextOption",
    "Payload",
    "ProtocolError",
    "RefusedOption",
    "Rep",
    "ServerCodec",
    "StartTlsOption",
    "State",
    "StructuredReplyOption",
    "TlsMode",
    "UnsupportedOption",
    "check_command",
    "export_flags",
]
