"""ServerCodec and check_command without sockets.

Expected bytes are written out by hand from /tmp/proto.md (NetworkBlockDevice/nbd
doc/proto.md), not computed with the codec's own structs, so a wrong field width
or order in the codec shows up here.
"""

from __future__ import annotations

import struct

import pytest

from mirrorpool.nbd import codec as c
from mirrorpool.nbd.codec import (
    NEED_DATA,
    AbortOption,
    ClientFlags,
    Command,
    ConnectionClosed,
    ExportLimits,
    ExportNameOption,
    GoOption,
    InvalidOption,
    ListOption,
    MetaContextOption,
    Payload,
    ProtocolError,
    RefusedOption,
    ServerCodec,
    StartTlsOption,
    State,
    StructuredReplyOption,
    TlsMode,
    UnsupportedOption,
    check_command,
    export_flags,
)
from mirrorpool.nbd.constants import MAX_OPTION_LENGTH, Cmd, CmdFlag, Errno

# Magic numbers spelled out from the spec, independent of constants.py.
IHAVEOPT = bytes.fromhex("49484156454F5054")
REQUEST_MAGIC = bytes.fromhex("25609513")
OPT_REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
SIMPLE_MAGIC = bytes.fromhex("67446698")
CHUNK_MAGIC = bytes.fromhex("668e33ef")

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_PEEK_EXPORT, OPT_STARTTLS = 1, 2, 3, 4, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 6, 7, 8, 9, 10
OPT_EXTENDED_HEADERS = 11


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return u32(len(raw)) + raw


def option(opt: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + u32(opt) + u32(len(data)) + data


def go_data(name: str | bytes, *requests: int) -> bytes:
    return s(name) + u16(len(requests)) + b"".join(u16(r) for r in requests)


def meta_data(export: str | bytes, *queries: str | bytes) -> bytes:
    return s(export) + u32(len(queries)) + b"".join(s(q) for q in queries)


def request(typ: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7,
            magic: bytes = REQUEST_MAGIC) -> bytes:
    return magic + u16(flags) + u16(typ) + u64(cookie) + u64(offset) + u32(length)


def in_options(client_flags: int = 1, tls: TlsMode = TlsMode.OFF) -> ServerCodec:
    codec = ServerCodec(tls=tls)
    codec.receive_data(u32(client_flags))
    assert isinstance(codec.next_event(), ClientFlags)
    assert codec.state is State.OPTIONS
    return codec


def in_transmission() -> ServerCodec:
    codec = in_options()
    codec.receive_data(option(OPT_GO, go_data("x")))
    assert isinstance(codec.next_event(), GoOption)
    codec.enter_transmission()
    assert codec.state is State.TRANSMISSION
    return codec


def one_option(data: bytes) -> object:
    codec = in_options()
    codec.receive_data(data)
    event = codec.next_event()
    assert codec.next_event() is NEED_DATA
    return event


def drain(codec: ServerCodec) -> list[object]:
    """Every event available now, up to NEED_DATA or the close."""
    events = []
    for _ in range(10_000):
        event = codec.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, ExportNameOption) or isinstance(event, GoOption) and event.go:
            codec.enter_transmission()
        if isinstance(event, ConnectionClosed):
            return events
    raise AssertionError("next_event never asked for more data")


def merge_payloads(events: list[object]) -> list[object]:
    out: list[object] = []
    for e in events:
        if isinstance(e, Payload) and out and isinstance(out[-1], Payload):
            out[-1] = Payload(out[-1].data + e.data)
        else:
            out.append(e)
    return out


# ---------------------------------------------------------------- greeting, client flags


def test_greeting_bytes() -> None:
    # NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE (bit 0) | NO_ZEROES (bit 1).
    assert ServerCodec().greeting() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"


@pytest.mark.parametrize("flags, no_zeroes", [(1, False), (3, True)])
def test_good_client_flags(flags: int, no_zeroes: bool) -> None:
    codec = ServerCodec()
    codec.receive_data(u32(flags)[:3])
    assert codec.next_event() is NEED_DATA
    codec.receive_data(u32(flags)[3:])
    event = codec.next_event()
    assert event == ClientFlags(flags)
    assert codec.state is State.OPTIONS
    assert codec.no_zeroes is no_zeroes




@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(0x47415242, id="garbage-without-fixed-newstyle"),  # b"GARB"
        pytest.param(0x1 | 0x4, id="bit2", marks=()),
        pytest.param(0x1 | 0x8000_0000, id="bit31", marks=()),
        pytest.param(0xFFFF_FFFF, id="all-ones", marks=()),
    ],
)
def test_unknown_client_flags_are_a_protocol_error(flags: int) -> None:
    # proto.md: "the server MUST drop the TCP connection if the client sets an unknown flag"
    codec = ServerCodec()
    codec.receive_data(u32(flags))
    with pytest.raises(ProtocolError):
        codec.next_event()
    assert codec.state is State.CLOSED


def test_eof_before_client_flags() -> None:
    codec = ServerCodec()
    codec.receive_data(b"\x00\x00")
    codec.receive_data(b"")
    assert codec.state is State.CLOSED
    assert isinstance(codec.next_event(), ConnectionClosed)


# ---------------------------------------------------------------- options


def test_go_with_info_requests() -> None:
    event = one_option(option(OPT_GO, go_data("disk-1", 3, 1)))
    assert event == GoOption("disk-1", (3, 1), go=True)


def test_info_is_go_without_go() -> None:
    event = one_option(option(OPT_INFO, go_data("disk-1", 0)))
    assert event == GoOption("disk-1", (0,), go=False)


def test_go_default_export_no_requests() -> None:
    assert one_option(option(OPT_GO, go_data(""))) == GoOption("", (), go=True)


def test_go_utf8_name() -> None:
    assert one_option(option(OPT_GO, go_data("dísk-€"))) == GoOption("dísk-€", (), go=True)


def test_export_name() -> None:
    assert one_option(option(OPT_EXPORT_NAME, b"disk-1")) == ExportNameOption("disk-1")
    assert one_option(option(OPT_EXPORT_NAME)) == ExportNameOption("")


def test_list() -> None:
    assert one_option(option(OPT_LIST)) == ListOption()


def test_abort_closes_and_ignores_data() -> None:
    codec = in_options()
    codec.receive_data(option(OPT_ABORT, b"ignored"))
    assert codec.next_event() == AbortOption()
    assert codec.state is State.CLOSED
    assert isinstance(codec.next_event(), ConnectionClosed)


def test_structured_reply() -> None:
    codec = in_options()
    assert codec.structured_replies is False
    codec.receive_data(option(OPT_STRUCTURED_REPLY))
    assert codec.next_event() == StructuredReplyOption()
    assert codec.structured_replies is True


def test_structured_reply_with_data_is_invalid_and_not_enabled() -> None:
    codec = in_options()
    codec.receive_data(option(OPT_STRUCTURED_REPLY, b"x"))
    event = codec.next_event()
    assert isinstance(event, InvalidOption) and event.option == OPT_STRUCTURED_REPLY
    assert codec.structured_replies is False


@pytest.mark.parametrize("opt, is_set", [(OPT_SET_META, True), (OPT_LIST_META, False)])
def test_meta_context_with_queries(opt: int, is_set: bool) -> None:
    event = one_option(option(opt, meta_data("disk-1", "base:allocation", "qemu:")))
    assert event == MetaContextOption("disk-1", ("base:allocation", "qemu:"), set=is_set)


def test_meta_context_without_queries() -> None:
    assert one_option(option(OPT_LIST_META, meta_data("d"))) == MetaContextOption(
        "d", (), set=False
    )


@pytest.mark.parametrize(
    "opt", [OPT_PEEK_EXPORT, OPT_EXTENDED_HEADERS, 0x1234, 0xFFFF_FFFF]
)
def test_unknown_option_is_skipped(opt: int) -> None:
    codec = in_options()
    # Its data is skipped whole: the option after it parses normally.
    codec.receive_data(option(opt, b"\x00" * 9 + IHAVEOPT) + option(OPT_LIST))
    assert codec.next_event() == UnsupportedOption(opt)
    assert codec.state is State.OPTIONS
    assert codec.next_event() == ListOption()


# ---------------------------------------------------------------- TLS

# Option reply types spelled out from the spec.
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_TLS_REQD = 2**31 + 5


def test_starttls_without_tls_is_refused_by_policy() -> None:
    codec = in_options()
    codec.receive_data(option(OPT_STARTTLS) + option(OPT_LIST))
    event = codec.next_event()
    assert isinstance(event, RefusedOption)
    assert (event.option, event.reply) == (OPT_STARTTLS, REP_ERR_POLICY)
    assert codec.next_event() == ListOption()  # negotiation goes on in plain text
    with pytest.raises(ProtocolError):
        codec.start_tls()


@pytest.mark.parametrize("mode", list(TlsMode))
def test_starttls_with_data_is_invalid(mode: TlsMode) -> None:
    codec = in_options(tls=mode)
    codec.receive_data(option(OPT_STARTTLS, b"x"))
    event = codec.next_event()
    assert isinstance(event, InvalidOption) and event.option == OPT_STARTTLS
    assert codec.state is State.OPTIONS and not codec.tls_active


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])
def test_starttls_then_a_second_one_is_invalid(mode: TlsMode) -> None:
    codec = in_options(tls=mode)
    codec.receive_data(option(OPT_STRUCTURED_REPLY) + option(OPT_STARTTLS))
    if mode is TlsMode.ON:
        assert codec.next_event() == StructuredReplyOption()
        assert codec.structured_replies
    else:
        assert isinstance(codec.next_event(), RefusedOption)
    assert codec.next_event() == StartTlsOption()
    assert codec.next_event() is NEED_DATA
    codec.start_tls()
    assert codec.tls_active
    assert not codec.structured_replies  # nothing from before TLS survives it
    codec.receive_data(option(OPT_STARTTLS) + option(OPT_GO, go_data("d")))
    event = codec.next_event()
    assert isinstance(event, InvalidOption) and event.option == OPT_STARTTLS
    assert codec.next_event() == GoOption("d", (), go=True)


@pytest.mark.parametrize(
    ("opt", "data"),
    [
        (OPT_LIST, b""),
        (OPT_INFO, go_data("d")),
        (OPT_GO, go_data("d")),
        (OPT_GO, b"\xff"),  # malformed too: TLS comes first
        (OPT_STRUCTURED_REPLY, b""),
        (OPT_SET_META, meta_data("d", "base:allocation")),
        (OPT_PEEK_EXPORT, b""),
        (0x1234, b"abc"),
    ],
)
def test_require_refuses_every_option_before_tls(opt: int, data: bytes) -> None:
    codec = in_options(tls=TlsMode.REQUIRE)
    codec.receive_data(option(opt, data))
    event = codec.next_event()
    assert isinstance(event, RefusedOption)
    assert (event.option, event.reply) == (opt, REP_ERR_TLS_REQD)
    assert not codec.structured_replies
    assert codec.state is State.OPTIONS


def test_require_lets_abort_through_before_tls() -> None:
    codec = in_options(tls=TlsMode.REQUIRE)
    codec.receive_data(option(OPT_ABORT))
    assert codec.next_event() == AbortOption()
    assert codec.state is State.CLOSED


def test_require_closes_on_export_name_before_tls() -> None:
    codec = in_options(tls=TlsMode.REQUIRE)
    codec.receive_data(option(OPT_EXPORT_NAME, b"d"))
    with pytest.raises(ProtocolError):
        codec.next_event()
    assert codec.state is State.CLOSED


def test_require_allows_export_name_after_tls() -> None:
    codec = in_options(tls=TlsMode.REQUIRE)
    codec.receive_data(option(OPT_STARTTLS))
    assert codec.next_event() == StartTlsOption()
    codec.start_tls()
    codec.receive_data(option(OPT_EXPORT_NAME, b"d"))
    assert codec.next_event() == ExportNameOption("d")


def test_on_mode_serves_plain_options() -> None:
    codec = in_options(tls=TlsMode.ON)
    codec.receive_data(option(OPT_LIST) + option(OPT_GO, go_data("d")))
    assert codec.next_event() == ListOption()
    assert codec.next_event() == GoOption("d", (), go=True)


def test_bytes_behind_starttls_are_refused() -> None:
    # Anything sent after STARTTLS but before the handshake is plain text that
    # would otherwise be taken as coming over TLS.
    codec = in_options(tls=TlsMode.ON)
    codec.receive_data(option(OPT_STARTTLS) + option(OPT_LIST))
    assert codec.next_event() == StartTlsOption()
    with pytest.raises(ProtocolError):
        codec.start_tls()
    assert codec.state is State.CLOSED and not codec.tls_active


MALFORMED = [
    pytest.param(OPT_LIST, b"x", id="list-with-data"),
    pytest.param(OPT_GO, b"", id="go-empty"),
    pytest.param(OPT_GO, b"\x00\x00", id="go-short-length"),
    pytest.param(OPT_GO, u32(10) + b"abc" + u16(0), id="go-name-truncated"),
    pytest.param(OPT_GO, s("abc"), id="go-no-request-count"),
    pytest.param(OPT_GO, s("abc") + u16(2) + u16(1), id="go-requests-truncated"),
    pytest.param(OPT_GO, go_data("abc", 1) + b"\x00", id="go-trailing-byte"),
    pytest.param(OPT_GO, go_data(b"a\x00b"), id="go-nul-in-name"),
    pytest.param(OPT_GO, go_data(b"\xff\xfe"), id="go-bad-utf8"),
    pytest.param(OPT_GO, go_data("a" * 4097), id="go-name-over-4096"),
    pytest.param(OPT_INFO, go_data("abc") + b"zz", id="info-trailing"),
    pytest.param(OPT_SET_META, b"", id="set-meta-empty"),
    pytest.param(OPT_SET_META, s("d"), id="set-meta-no-count"),
    pytest.param(OPT_SET_META, s("d") + u32(1), id="set-meta-query-missing"),
    pytest.param(OPT_SET_META, s("d") + u32(1) + u32(50) + b"base:", id="set-meta-query-cut"),
    pytest.param(OPT_SET_META, s("d") + u32(0xFFFF_FFFF), id="set-meta-huge-count"),
    pytest.param(OPT_SET_META, meta_data("d", "base:allocation") + b"\x00",
                 id="set-meta-trailing"),
    pytest.param(OPT_LIST_META, meta_data("d", b"base:\x00"), id="list-meta-nul-in-query"),
    pytest.param(OPT_LIST_META, meta_data(b"d\x00"), id="list-meta-nul-in-export"),
]


@pytest.mark.parametrize("opt, data", MALFORMED)
def test_malformed_option_is_invalid_and_negotiation_goes_on(opt: int, data: bytes) -> None:
    codec = in_options()
    codec.receive_data(option(opt, data) + option(OPT_LIST))
    event = codec.next_event()
    assert isinstance(event, InvalidOption), event
    assert event.option == opt
    assert event.reason
    assert codec.state is State.OPTIONS
    assert codec.next_event() == ListOption()


@pytest.mark.parametrize(
    "data", [b"a\x00b", b"\xff", b"a" * 4097], ids=["nul", "bad-utf8", "over-4096"]
)
def test_malformed_export_name_is_a_protocol_error(data: bytes) -> None:
    # NBD_OPT_EXPORT_NAME has no error reply: the server can only terminate the session.
    codec = in_options()
    codec.receive_data(option(OPT_EXPORT_NAME, data))
    with pytest.raises(ProtocolError):
        codec.next_event()


def test_malformed_export_name_closes_the_codec() -> None:
    codec = in_options()
    codec.receive_data(option(OPT_EXPORT_NAME, b"a\x00b") + option(OPT_LIST))
    with pytest.raises(ProtocolError):
        codec.next_event()
    assert codec.state is State.CLOSED
    assert isinstance(codec.next_event(), ConnectionClosed)


def test_bad_option_magic() -> None:
    codec = in_options()
    codec.receive_data(b"IHAVEOPX" + u32(OPT_LIST) + u32(0))
    with pytest.raises(ProtocolError):
        codec.next_event()
    assert codec.state is State.CLOSED


def test_option_length_over_limit_is_refused_from_the_header_alone() -> None:
    codec = in_options()
    codec.receive_data(IHAVEOPT + u32(0x1234) + u32(MAX_OPTION_LENGTH + 1))
    with pytest.raises(ProtocolError):
        codec.next_event()
    assert codec.state is State.CLOSED


def test_option_length_at_limit_is_accepted() -> None:
    codec = in_options()
    codec.receive_data(option(0x1234, bytes(MAX_OPTION_LENGTH)))
    assert codec.next_event() == UnsupportedOption(0x1234)


def test_option_waits_for_its_whole_payload() -> None:
    codec = in_options()
    wire = option(OPT_GO, go_data("disk", 1, 3))
    codec.receive_data(wire[:-1])
    assert codec.next_event() is NEED_DATA
    codec.receive_data(wire[-1:])
    assert codec.next_event() == GoOption("disk", (1, 3), go=True)


def test_eof_during_options() -> None:
    codec = in_options()
    codec.receive_data(option(OPT_LIST)[:5])
    codec.receive_data(b"")
    assert isinstance(codec.next_event(), ConnectionClosed)
    assert codec.state is State.CLOSED


def test_enter_transmission_only_from_options() -> None:
    with pytest.raises(ProtocolError):
        ServerCodec().enter_transmission()


def test_bytes_pipelined_after_go_are_kept_for_the_io_layer() -> None:
    codec = in_options()
    header = request(Cmd.READ, 0, 512)
    codec.receive_data(option(OPT_GO, go_data("d")) + header)
    assert isinstance(codec.next_event(), GoOption)
    codec.enter_transmission()
    assert codec.take_all_buffered() == header
    assert codec.take_all_buffered() == b""


# ---------------------------------------------------------------- chunking


def session_bytes() -> bytes:
    data = bytes(range(256)) * 5
    return (
        u32(3)
        + option(0x99, b"junk")
        + option(OPT_LIST)
        + option(OPT_STRUCTURED_REPLY)
        + option(OPT_LIST_META, meta_data("disk", "base:"))
        + option(OPT_SET_META, meta_data("disk", "base:allocation"))
        + option(OPT_INFO, go_data("disk", 3))
        + option(OPT_GO, go_data("disk", 3, 1))
        + request(Cmd.READ, 4096, 512, cookie=1)
        + request(Cmd.WRITE, 0, len(data), flags=CmdFlag.FUA, cookie=2)
        + data
        + request(Cmd.WRITE, 0, 0, cookie=3)
        + request(Cmd.FLUSH, cookie=4)
        + request(Cmd.DISC, cookie=5)
    )


def test_byte_at_a_time_gives_the_same_events_as_all_at_once() -> None:
    wire = session_bytes()
    whole = ServerCodec()
    whole.receive_data(wire)
    expected = drain(whole)

    trickle = ServerCodec()
    got: list[object] = []
    for i in range(len(wire)):
        trickle.receive_data(wire[i : i + 1])
        got += drain(trickle)

    assert [type(e).__name__ for e in expected][:9] == [
        "ClientFlags", "UnsupportedOption", "ListOption", "StructuredReplyOption",
        "MetaContextOption", "MetaContextOption", "GoOption", "GoOption", "Command",
    ]
    assert merge_payloads(got) == merge_payloads(expected)
    # Byte at a time, the 1280-byte payload comes as 1280 one-byte Payload events.
    assert sum(isinstance(e, Payload) for e in got) == 1280
    assert trickle.state is whole.state is State.TRANSMISSION


# ---------------------------------------------------------------- transmission


def test_request_header_to_command() -> None:
    codec = in_transmission()
    codec.receive_data(request(Cmd.TRIM, offset=2**40 + 5, length=0x10000, flags=CmdFlag.FUA,
                               cookie=0x0102030405060708))
    event = codec.next_event()
    assert event == Command(flags=1, type=4, cookie=0x0102030405060708, offset=2**40 + 5,
                            length=0x10000, payload_length=0)
    assert codec.state is State.TRANSMISSION


def test_read_header_has_no_payload() -> None:
    codec = in_transmission()
    codec.receive_data(request(Cmd.READ, 0, 1 << 20) + request(Cmd.FLUSH, cookie=9))
    first = codec.next_event()
    assert isinstance(first, Command) and first.payload_length == 0
    second = codec.next_event()
    assert isinstance(second, Command) and second.cookie == 9


def test_partial_header_needs_data() -> None:
    codec = in_transmission()
    codec.receive_data(request(Cmd.READ)[:27])
    assert codec.next_event() is NEED_DATA


@pytest.mark.parametrize("magic", [b"\x00" * 4, bytes.fromhex("12560953"),
                                   bytes.fromhex("25609514"), CHUNK_MAGIC])
def test_bad_request_magic(magic: bytes) -> None:
    codec = in_transmission()
    codec.receive_data(request(Cmd.READ, magic=magic))
    with pytest.raises(ProtocolError):
        codec.next_event()
    assert codec.state is State.CLOSED


def test_decode_command_bad_magic_fast_path() -> None:
    codec = in_transmission()
    with pytest.raises(ProtocolError):
        codec.decode_command(request(Cmd.READ, magic=b"\xde\xad\xbe\xef"))
    assert codec.state is State.CLOSED


def test_decode_command_outside_transmission() -> None:
    with pytest.raises(ProtocolError):
        in_options().decode_command(request(Cmd.READ))


def test_write_payload_as_events() -> None:
    codec = in_transmission()
    data = bytes(range(200)) * 10
    codec.receive_data(request(Cmd.WRITE, 0, len(data), cookie=1) + data[:700])
    cmd = codec.next_event()
    assert isinstance(cmd, Command) and cmd.payload_length == len(data)
    assert codec.state is State.PAYLOAD
    assert codec.next_event() == Payload(data[:700])
    assert codec.payload_left == len(data) - 700
    assert codec.next_event() is NEED_DATA
    # The rest of the payload and the next header in one chunk: the Payload event
    # must stop exactly at the payload's end.
    codec.receive_data(data[700:] + request(Cmd.FLUSH, cookie=2))
    assert codec.next_event() == Payload(data[700:])
    assert codec.state is State.TRANSMISSION
    assert codec.payload_left == 0
    flush = codec.next_event()
    assert isinstance(flush, Command) and flush.type == Cmd.FLUSH and flush.cookie == 2


def test_write_payload_read_externally() -> None:
    codec = in_transmission()
    cmd = codec.decode_command(request(Cmd.WRITE, 512, 4096))
    assert cmd.payload_length == 4096
    assert codec.state is State.PAYLOAD
    with pytest.raises(ProtocolError):  # no header while a payload is outstanding
        codec.decode_command(request(Cmd.READ))
    codec.payload_consumed(1000)
    assert codec.state is State.PAYLOAD and codec.payload_left == 3096
    codec.payload_consumed(3096)
    assert codec.state is State.TRANSMISSION and codec.payload_left == 0
    again = codec.decode_command(request(Cmd.READ, 0, 8, cookie=11))
    assert again.cookie == 11


def test_payload_consumed_out_of_step() -> None:
    codec = in_transmission()
    with pytest.raises(ProtocolError):
        codec.payload_consumed(1)  # no WRITE outstanding
    codec.decode_command(request(Cmd.WRITE, 0, 10))
    with pytest.raises(ProtocolError):
        codec.payload_consumed(11)


def test_zero_length_write_has_no_payload() -> None:
    codec = in_transmission()
    cmd = codec.decode_command(request(Cmd.WRITE, 0, 0))
    assert cmd.payload_length == 0
    assert codec.state is State.TRANSMISSION


def test_eof_mid_payload() -> None:
    codec = in_transmission()
    codec.receive_data(request(Cmd.WRITE, 0, 100) + b"x" * 40)
    assert isinstance(codec.next_event(), Command)
    assert codec.next_event() == Payload(b"x" * 40)
    codec.receive_data(b"")
    assert isinstance(codec.next_event(), ConnectionClosed)
    assert codec.state is State.CLOSED


# ---------------------------------------------------------------- check_command

SIZE = 1 << 20
MAX_PAYLOAD = 32 << 20
RW = ExportLimits(size=SIZE, read_only=False, max_payload=MAX_PAYLOAD, structured_replies=True)
RO = ExportLimits(size=SIZE, read_only=True, max_payload=MAX_PAYLOAD, structured_replies=True)
SIMPLE = ExportLimits(size=SIZE, read_only=False, max_payload=MAX_PAYLOAD,
                      structured_replies=False)


def verdict(typ: int, offset: int = 0, length: int = 512, flags: int = 0,
            limits: ExportLimits = RW) -> Errno:
    code, why = check_command(Command(flags, typ, 1, offset, length), limits)
    assert bool(why) == (code != Errno.OK), (code, why)
    return code


@pytest.mark.parametrize("typ", [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES,
                                 Cmd.BLOCK_STATUS])
def test_in_range_request_is_ok(typ: int) -> None:
    assert verdict(typ, SIZE - 4096, 4096) == Errno.OK


def test_flush_is_ok() -> None:
    assert verdict(Cmd.FLUSH, 0, 0) == Errno.OK


@pytest.mark.parametrize("typ", [8, 99, 0x4D50, 0xFFFF])
def test_unknown_command_is_einval(typ: int) -> None:
    assert verdict(typ) == Errno.EINVAL


def test_extra_command_is_allowed_when_negotiated() -> None:
    limits = ExportLimits(SIZE, False, MAX_PAYLOAD, True, frozenset({Cmd.TRIGGER}))
    assert verdict(Cmd.TRIGGER, limits=limits) == Errno.OK


@pytest.mark.parametrize(
    "typ, flags",
    [
        (Cmd.READ, CmdFlag.FUA | CmdFlag.DF),
        (Cmd.WRITE, CmdFlag.FUA),
        (Cmd.FLUSH, CmdFlag.FUA),
        (Cmd.WRITE_ZEROES, CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
        (Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE),
    ],
)
def test_documented_flags_are_ok(typ: int, flags: int) -> None:
    assert verdict(typ, flags=flags) == Errno.OK


@pytest.mark.parametrize(
    "typ, flags",
    [
        (Cmd.READ, CmdFlag.REQ_ONE),
        (Cmd.READ, CmdFlag.NO_HOLE),
        (Cmd.WRITE, CmdFlag.DF),
        (Cmd.WRITE, CmdFlag.FAST_ZERO),
        (Cmd.TRIM, CmdFlag.NO_HOLE),
        (Cmd.BLOCK_STATUS, CmdFlag.DF),
    ],
)
def test_flag_not_valid_for_the_command_is_einval(typ: int, flags: int) -> None:
    assert verdict(typ, flags=flags) == Errno.EINVAL


@pytest.mark.parametrize("typ, flags", [(Cmd.READ, 1 << 5), (Cmd.WRITE, 1 << 9),
                                        (Cmd.FLUSH, 1 << 15)])
def test_unknown_flag_bit_is_einval(typ: int, flags: int) -> None:
    # proto.md: "The server SHOULD return NBD_EINVAL if it receives an unknown command flag."
    assert verdict(typ, flags=flags) == Errno.EINVAL


@pytest.mark.parametrize("offset, length", [(SIZE - 511, 512), (SIZE, 1), (2**64 - 1, 2)])
def test_read_beyond_end_is_einval(offset: int, length: int) -> None:
    assert verdict(Cmd.READ, offset, length) == Errno.EINVAL


@pytest.mark.parametrize("typ", [Cmd.WRITE, Cmd.WRITE_ZEROES])
def test_write_beyond_end_is_enospc(typ: int) -> None:
    assert verdict(typ, SIZE - 4096, 8192) == Errno.ENOSPC


def test_trim_beyond_end_is_einval() -> None:
    assert verdict(Cmd.TRIM, SIZE - 4096, 8192) == Errno.EINVAL


@pytest.mark.parametrize("typ", [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES])
def test_mutation_on_read_only_is_eperm(typ: int) -> None:
    assert verdict(typ, limits=RO) == Errno.EPERM


def test_read_on_read_only_is_ok() -> None:
    assert verdict(Cmd.READ, limits=RO) == Errno.OK


def test_read_over_max_payload_is_eoverflow() -> None:
    assert verdict(Cmd.READ, 0, MAX_PAYLOAD, limits=ExportLimits(
        4 * MAX_PAYLOAD, False, MAX_PAYLOAD, True)) == Errno.OK
    assert verdict(Cmd.READ, 0, MAX_PAYLOAD + 1, limits=ExportLimits(
        4 * MAX_PAYLOAD, False, MAX_PAYLOAD, True)) == Errno.EOVERFLOW


def test_write_over_max_payload_is_refused() -> None:
    # Not EOVERFLOW: proto.md reserves it for READ and for commands without payload.
    code = verdict(Cmd.WRITE, 0, MAX_PAYLOAD + 1,
                   limits=ExportLimits(4 * MAX_PAYLOAD, False, MAX_PAYLOAD, True))
    assert code == Errno.EINVAL


def test_block_status_needs_structured_replies() -> None:
    assert verdict(Cmd.BLOCK_STATUS, limits=SIMPLE) == Errno.EINVAL
    assert verdict(Cmd.BLOCK_STATUS, limits=RW) == Errno.OK


def test_block_status_of_zero_length_is_einval() -> None:
    assert verdict(Cmd.BLOCK_STATUS, 0, 0) == Errno.EINVAL


# ---------------------------------------------------------------- reply encoders


def test_option_reply_bytes() -> None:
    got = ServerCodec().encode_option_reply(7, 2**31 + 6, b"nope")
    assert got == OPT_REPLY_MAGIC + bytes.fromhex("00000007" "80000006" "00000004") + b"nope"


def test_option_reply_ack_has_no_data() -> None:
    got = ServerCodec().encode_option_reply(8, 1)
    assert got == OPT_REPLY_MAGIC + bytes.fromhex("00000008" "00000001" "00000000")


@pytest.mark.parametrize("no_zeroes, padding", [(False, 124), (True, 0)])
def test_export_name_reply(no_zeroes: bool, padding: int) -> None:
    codec = in_options(client_flags=3 if no_zeroes else 1)
    got = codec.encode_export_name_reply(0x0102030405060708, 0x0DED)
    assert got == bytes.fromhex("0102030405060708" "0ded") + bytes(padding)


def test_info_export_bytes() -> None:
    # 16-bit type 0, 64-bit size, 16-bit flags: length 12.
    got = c.encode_info_export(64 << 20, 0x0D6D)
    assert got == bytes.fromhex("0000" "0000000004000000" "0d6d")


def test_info_name_and_description_bytes() -> None:
    assert c.encode_info_name("dísk") == b"\x00\x01" + "dísk".encode()
    assert c.encode_info_description("a disk") == b"\x00\x02a disk"


def test_info_block_size_bytes() -> None:
    # 16-bit type 3, then minimum, preferred, maximum as 32-bit each: length 14.
    got = c.encode_info_block_size(1, 4096, 32 << 20)
    assert got == bytes.fromhex("0003" "00000001" "00001000" "02000000")


def test_server_entry_bytes() -> None:
    assert c.encode_server_entry("lu1", "desc") == bytes.fromhex("00000003") + b"lu1desc"
    assert c.encode_server_entry("é") == bytes.fromhex("00000002") + "é".encode()


def test_meta_context_bytes() -> None:
    assert c.encode_meta_context(1, "base:allocation") == b"\x00\x00\x00\x01base:allocation"


def test_simple_reply_bytes() -> None:
    got = c.encode_simple_reply(0x1122334455667788, 28)
    assert got == SIMPLE_MAGIC + bytes.fromhex("0000001c" "1122334455667788")
    assert c.encode_simple_reply(5) == SIMPLE_MAGIC + bytes(4) + u64(5)


def test_chunk_header_bytes() -> None:
    got = c.encode_chunk_header(0xAABB, 1, 0x1008)
    assert got == CHUNK_MAGIC + bytes.fromhex("0001" "0001" "000000000000aabb" "00001008")
    not_done = c.encode_chunk_header(0xAABB, 5, 12, done=False)
    assert not_done == CHUNK_MAGIC + bytes.fromhex("0000" "0005" "000000000000aabb" "0000000c")


def test_offset_data_header_bytes() -> None:
    # Chunk length counts the 8-byte offset plus the data that follows.
    got = c.encode_offset_data_header(3, 0x10000, 4096)
    assert got == CHUNK_MAGIC + bytes.fromhex(
        "0001" "0001" "0000000000000003" "00001008" "0000000000010000"
    )


def test_error_chunk_bytes() -> None:
    got = c.encode_error_chunk(9, 22, "bad")
    assert got == CHUNK_MAGIC + bytes.fromhex(
        "0001" "8001" "0000000000000009" "00000009" "00000016" "0003"
    ) + b"bad"


def test_error_chunk_without_message() -> None:
    got = c.encode_error_chunk(9, 5)
    assert got == CHUNK_MAGIC + bytes.fromhex(
        "0001" "8001" "0000000000000009" "00000006" "00000005" "0000"
    )


def test_error_chunk_message_capped_at_4096_bytes() -> None:
    got = c.encode_error_chunk(1, 22, "x" * 5000)
    (length,) = struct.unpack(">I", got[16:20])
    (msg_len,) = struct.unpack(">H", got[24:26])
    assert msg_len == 4096
    assert length == 6 + msg_len == len(got) - 20


def test_error_chunk_message_stays_valid_utf8() -> None:
    got = c.encode_error_chunk(1, 22, "€" * 2000)  # 6000 bytes of 3-byte characters
    (msg_len,) = struct.unpack(">H", got[24:26])
    assert msg_len <= 4096
    got[26 : 26 + msg_len].decode("utf-8")


def test_block_status_chunk_bytes() -> None:
    got = c.encode_block_status(4, 1, [(4096, 0), (61440, 3)])
    assert got == CHUNK_MAGIC + bytes.fromhex(
        "0000" "0005" "0000000000000004" "00000014"
        "00000001" "00001000" "00000000" "0000f000" "00000003"
    )


def test_done_chunk_bytes() -> None:
    assert c.encode_done(4) == CHUNK_MAGIC + bytes.fromhex(
        "0001" "0000" "0000000000000004" "00000000"
    )


def test_error_reply_simple_or_structured() -> None:
    assert c.encode_error_reply(2, 22, structured=False, message="m") == c.encode_simple_reply(
        2, 22
    )
    assert c.encode_error_reply(2, 22, structured=True, message="m") == c.encode_error_chunk(
        2, 22, "m"
    )


def test_export_flags_values() -> None:
    # Bits from proto.md "Transmission flags".
    has_flags, read_only, flush, fua, trim, zeroes, df, multi, cache, fast_zero = (
        1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 5, 1 << 6, 1 << 7, 1 << 8, 1 << 10, 1 << 11
    )
    rw = export_flags(read_only=False)
    ro = export_flags(read_only=True)
    assert rw & has_flags and ro & has_flags
    assert not rw & read_only and ro & read_only
    for bit in (flush, fua, multi, cache):
        assert rw & bit and ro & bit
    assert rw & trim and rw & zeroes and rw & fast_zero
    # FAST_ZERO MUST be clear when WRITE_ZEROES is.
    assert not ro & zeroes and not ro & fast_zero and not ro & trim
    assert rw & df == ro & df
    assert rw < 1 << 16 and ro < 1 << 16
