"""Property tests of ServerCodec: hostile bytes, arbitrary chunking, round trips.

The encoder here is written from proto.md, independent of the codec.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrorpool.nbd.codec import (
    NEED_DATA,
    AbortOption,
    ClientFlags,
    Command,
    ConnectionClosed,
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
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

IHAVEOPT = b"IHAVEOPT"
REQUEST_MAGIC = bytes.fromhex("25609513")
# STARTTLS (5) is known too: refused by policy when TLS is off, the codec's default.
KNOWN_OPTIONS = {1, 2, 3, 5, 6, 7, 8, 9, 10}


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def nbd_string(text: str) -> bytes:
    raw = text.encode()
    return u32(len(raw)) + raw


def option(opt: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + u32(opt) + u32(len(data)) + data


def request(typ: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST_MAGIC + struct.pack(">HHQQI", flags, typ, cookie, offset, length)


# ---------------------------------------------------------------- a bounded driver


@dataclass
class Run:
    events: list[object]
    error: ProtocolError | None
    calls: int


def run(chunks: list[bytes], eof: bool = False) -> Run:
    """Feed ``chunks`` one by one, taking every event after each; enter transmission on GO.

    Fails the test if next_event is called more often than the input could justify:
    every event but the terminal ones consumes at least one byte.
    """
    codec = ServerCodec()
    budget = sum(len(ch) for ch in chunks) + 2 * len(chunks) + 4
    events: list[object] = []
    calls = 0
    feed = [*chunks, b""] if eof else chunks
    try:
        for chunk in feed:
            codec.receive_data(chunk)
            while True:
                calls += 1
                assert calls <= budget, f"next_event called {calls} times for {budget}"
                event = codec.next_event()
                if event is NEED_DATA:
                    break
                events.append(event)
                if isinstance(event, ConnectionClosed):
                    return Run(events, None, calls)
                if isinstance(event, ExportNameOption) or isinstance(event, GoOption) and event.go:
                    codec.enter_transmission()
    except ProtocolError as exc:
        return Run(events, exc, calls)
    return Run(events, None, calls)


def merged(events: list[object]) -> list[object]:
    """Payload events depend on how bytes arrived; their concatenation does not."""
    out: list[object] = []
    for e in events:
        if isinstance(e, Payload) and out and isinstance(out[-1], Payload):
            out[-1] = Payload(out[-1].data + e.data)
        else:
            out.append(e)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


# ---------------------------------------------------------------- hostile input

# Fragments that steer random bytes into the deeper states now and then.
FRAGMENTS = st.sampled_from(
    [
        u32(1),
        u32(3),
        IHAVEOPT,
        REQUEST_MAGIC,
        option(7, nbd_string("d") + u16(0)),
        option(1, b"d"),
        option(8),
        option(2),
        u32(0xFFFF_FFFF),
        request(1, 0, 1, 0, 40),
        request(0, 0, 2, 0, 512),
        b"\x00" * 28,
    ]
)
# A valid prefix (sometimes) so that the random part also lands in later states.
PREFIXES = st.sampled_from(
    [
        b"",
        u32(1),
        u32(3) + option(8) + option(3),
        u32(1) + option(7, nbd_string("d") + u16(1) + u16(3)),
        u32(3) + option(1, b"d"),
    ]
)
# Well-framed options of every known number around payloads built from the pieces
# option data is made of (lengths, counts, NUL, bytes that are not UTF-8).
OPTION_DATA_PIECES = st.one_of(
    st.binary(max_size=8),
    st.binary(max_size=6).map(lambda b: u32(len(b)) + b),  # a length-prefixed string
    st.integers(0, 8).map(u32),
    st.integers(0, 4).map(u16),
    st.sampled_from([b"\x00", b"\xff", "é".encode(), u32(0xFFFF_FFFF), u32(4097)]),
)
OPTION_FRAMES = st.builds(
    lambda opt, parts: option(opt, b"".join(parts)),
    st.integers(0, 12),
    st.lists(OPTION_DATA_PIECES, max_size=6),
)
HOSTILE = st.tuples(
    PREFIXES,
    st.lists(st.one_of(st.binary(max_size=64), FRAGMENTS, OPTION_FRAMES), max_size=12),
).map(lambda t: t[0] + b"".join(t[1]))


@FUZZ
@given(data=HOSTILE, cuts=st.lists(st.integers(0, 1024), max_size=20), eof=st.booleans())
def test_hostile_bytes_raise_only_protocol_error(data: bytes, cuts: list[int], eof: bool) -> None:
    # Any other exception, or the budget assertion, fails the test.
    run(split(data, cuts), eof=eof)


@FUZZ
@given(data=HOSTILE, cuts=st.lists(st.integers(0, 1024), max_size=20))
def test_chunking_does_not_change_events(data: bytes, cuts: list[int]) -> None:
    whole = run([data] if data else [])
    pieces = run(split(data, cuts))
    assert merged(pieces.events) == merged(whole.events)
    assert (pieces.error is None) == (whole.error is None)


@FUZZ
@given(data=HOSTILE)
def test_byte_at_a_time_matches_whole(data: bytes) -> None:
    whole = run([data] if data else [])
    trickle = run([data[i : i + 1] for i in range(len(data))])
    assert merged(trickle.events) == merged(whole.events)
    assert (trickle.error is None) == (whole.error is None)


@FUZZ
@given(headers=st.lists(st.binary(min_size=28, max_size=28), max_size=8),
       payload=st.binary(max_size=200))
def test_fast_path_raises_only_protocol_error(headers: list[bytes], payload: bytes) -> None:
    """The I/O layer's own path: decode_command on raw headers, payload_consumed after."""
    codec = ServerCodec()
    codec.receive_data(u32(1) + option(7, nbd_string("d") + u16(0)))
    assert isinstance(codec.next_event(), ClientFlags)
    assert isinstance(codec.next_event(), GoOption)
    codec.enter_transmission()
    try:
        for header in headers:
            cmd = codec.decode_command(header)
            if cmd.payload_length:
                # Consume it in two uneven steps, as a short recv would.
                first = min(len(payload), cmd.payload_length)
                codec.payload_consumed(first)
                codec.payload_consumed(cmd.payload_length - first)
            assert codec.state is State.TRANSMISSION
    except ProtocolError:
        assert codec.state is State.CLOSED


# ---------------------------------------------------------------- round trips

NAMES = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=40,
).filter(lambda t: len(t.encode()) <= 4096)


@st.composite
def options(draw: st.DrawFn) -> tuple[bytes, object]:
    """One option that keeps negotiation going: (wire bytes, expected event)."""
    kind = draw(st.sampled_from(["info", "list", "sr", "meta", "unknown"]))
    if kind == "info":
        name = draw(NAMES)
        reqs = draw(st.lists(st.integers(0, 0xFFFF), max_size=6))
        data = nbd_string(name) + u16(len(reqs)) + b"".join(u16(r) for r in reqs)
        return option(6, data), GoOption(name, tuple(reqs), go=False)
    if kind == "list":
        return option(3), ListOption()
    if kind == "sr":
        return option(8), StructuredReplyOption()
    if kind == "meta":
        is_set = draw(st.booleans())
        export = draw(NAMES)
        queries = draw(st.lists(NAMES, max_size=4))
        data = nbd_string(export) + u32(len(queries)) + b"".join(nbd_string(q) for q in queries)
        return option(10 if is_set else 9, data), MetaContextOption(export, tuple(queries), is_set)
    opt = draw(st.integers(0, 2**32 - 1).filter(lambda o: o not in KNOWN_OPTIONS))
    return option(opt, draw(st.binary(max_size=100))), UnsupportedOption(opt)


@st.composite
def endings(draw: st.DrawFn) -> tuple[bytes, list[object]]:
    kind = draw(st.sampled_from(["go", "export_name", "abort", "none"]))
    name = draw(NAMES)
    if kind == "go":
        reqs = draw(st.lists(st.integers(0, 3), max_size=4, unique=True))
        data = nbd_string(name) + u16(len(reqs)) + b"".join(u16(r) for r in reqs)
        return option(7, data), [GoOption(name, tuple(reqs), go=True)]
    if kind == "export_name":
        return option(1, name.encode()), [ExportNameOption(name)]
    if kind == "abort":
        # ABORT closes the codec; the next event says so.
        return option(2), [AbortOption(), ConnectionClosed()]
    return b"", []


@st.composite
def commands(draw: st.DrawFn) -> tuple[bytes, list[object]]:
    typ = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 99]))
    flags = draw(st.integers(0, 0xFFFF))
    cookie = draw(st.integers(0, 2**64 - 1))
    offset = draw(st.integers(0, 2**64 - 1))
    if typ == 1:
        data = draw(st.binary(max_size=300))
        cmd = Command(flags, typ, cookie, offset, len(data), len(data))
        expected: list[object] = [cmd, Payload(data)] if data else [cmd]
        return request(typ, flags, cookie, offset, len(data)) + data, expected
    length = draw(st.integers(0, 2**32 - 1))
    return request(typ, flags, cookie, offset, length), [Command(flags, typ, cookie, offset,
                                                                 length, 0)]


@FUZZ
@given(
    flags=st.sampled_from([1, 3]),
    opts=st.lists(options(), max_size=8),
    ending=endings(),
    cmds=st.lists(commands(), max_size=6),
    cuts=st.lists(st.integers(0, 4096), max_size=30),
)
def test_valid_stream_round_trips(
    flags: int,
    opts: list[tuple[bytes, object]],
    ending: tuple[bytes, list[object]],
    cmds: list[tuple[bytes, list[object]]],
    cuts: list[int],
) -> None:
    end_wire, end_events = ending
    entered = bool(end_events) and not isinstance(end_events[0], AbortOption)
    wire = u32(flags) + b"".join(w for w, _ in opts) + end_wire
    expected: list[object] = [ClientFlags(flags), *(e for _, e in opts), *end_events]
    if entered:
        wire += b"".join(w for w, _ in cmds)
        expected += [e for _, evs in cmds for e in evs]

    result = run(split(wire, cuts))

    assert result.error is None
    assert merged(result.events) == expected


def test_structured_reply_flag_follows_the_option() -> None:
    codec = ServerCodec()
    codec.receive_data(u32(1) + option(3) + option(8))
    assert isinstance(codec.next_event(), ClientFlags)
    assert isinstance(codec.next_event(), ListOption)
    assert not codec.structured_replies
    assert isinstance(codec.next_event(), StructuredReplyOption)
    assert codec.structured_replies


# ---------------------------------------------------------------- mutated options


# Options whose payload must parse exactly: any truncation or extension is invalid.
EXACT_OPTIONS = {3, 6, 7, 8, 9, 10}


@st.composite
def mutated_options(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A valid option whose payload is then damaged, the framing kept valid; and
    whether the damage must make it an InvalidOption."""
    wire, _ = draw(st.one_of(options(), endings().filter(lambda e: bool(e[0]))))
    (opt,) = struct.unpack(">I", wire[8:12])
    data = bytearray(wire[16:])
    where = draw(st.integers(0, len(data)))
    how = draw(st.sampled_from(["truncate", "extend", "replace", "insert"]))
    must_be_invalid = opt in EXACT_OPTIONS and (
        how == "extend" or how == "truncate" and where < len(data)
    )
    if how == "truncate":
        del data[where:]
    elif how == "extend":
        data += draw(st.binary(min_size=1, max_size=8))
    elif how == "replace" and data:
        data[min(where, len(data) - 1)] = draw(st.sampled_from([0x00, 0xFF, 0x80, 0xC3, 0x01]))
    else:
        data[where:where] = draw(st.sampled_from([b"\x00", b"\xff", b"\xc3", u32(1), u16(9)]))
    return option(opt, bytes(data)), must_be_invalid


@FUZZ
@given(mutated=st.lists(mutated_options(), min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 2048), max_size=10))
def test_mutated_options_never_break_framing(
    mutated: list[tuple[bytes, bool]], cuts: list[int]
) -> None:
    """Each damaged option gives exactly one event; only EXPORT_NAME may end the session."""
    opts = [wire for wire, _ in mutated]
    result = run(split(u32(1) + b"".join(opts), cuts))
    events = result.events[1:]  # after ClientFlags
    ended = next(
        (i for i, e in enumerate(events)
         if isinstance(e, AbortOption | ExportNameOption) or isinstance(e, GoOption) and e.go),
        None,
    )
    if ended is not None:
        # Negotiation is over: what follows is transmission traffic, not options.
        events = events[: ended + 1]
    elif result.error is not None:
        # Only a malformed EXPORT_NAME (which has no error reply) may raise.
        bad = opts[len(events)]
        assert struct.unpack(">I", bad[8:12])[0] == 1, (result.error, bad)
    else:
        assert len(events) == len(opts)
    for event, (wire, must_be_invalid) in zip(events, mutated, strict=False):
        (opt,) = struct.unpack(">I", wire[8:12])
        if isinstance(event, InvalidOption | UnsupportedOption):
            assert event.option == opt
        if must_be_invalid:
            assert isinstance(event, InvalidOption), (event, wire)


# ---------------------------------------------------------------- TLS required


@FUZZ
@given(frames=st.lists(OPTION_FRAMES, max_size=10), cuts=st.lists(st.integers(0, 1024),
                                                                   max_size=10))
def test_require_mode_serves_nothing_before_tls(frames: list[bytes], cuts: list[int]) -> None:
    """Before STARTTLS, a FORCEDTLS codec yields refusals, ABORT or STARTTLS, never an export."""
    codec = ServerCodec(tls=TlsMode.REQUIRE)
    try:
        for chunk in split(u32(1) + b"".join(frames), cuts):
            codec.receive_data(chunk)
            while (event := codec.next_event()) is not NEED_DATA:
                if isinstance(event, StartTlsOption | AbortOption | ConnectionClosed):
                    return
                assert isinstance(event, ClientFlags | RefusedOption | InvalidOption), event
                if isinstance(event, InvalidOption):  # only a STARTTLS carrying data
                    assert event.option == 5
    except ProtocolError:
        assert codec.state is State.CLOSED
    assert not codec.structured_replies
