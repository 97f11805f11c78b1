"""Hostile and malformed NBD traffic against a real device, spoken by hand.

Every case ends by checking that the device still serves: a fresh connection
does a write/read round trip, a connection opened before all the bad traffic of
this module still works, and the device log shows no unexpected exception.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.helpers.processes import DeviceProcess
from tests.interop import rawnbd as r
from tests.interop.rawnbd import Closed, RawNbd, open_export
from tests.interop.support import wait_until

MiB = 1 << 20
MAX_PAYLOAD = 32 * MiB  # the spec's default, and what the device advertises
HEALTH_AREA = 1 * MiB  # [1 MiB, 2 MiB): the health check's own scratch space


@pytest.fixture(scope="module")
def lu(device: DeviceProcess) -> Iterator[str]:
    name = device.create_lu("64M", pool=0)
    yield name
    status, body = device.request("DELETE", f"/v1/lus/{name}?force=true")  # faster than the CLI
    assert status == 204, body


@dataclass
class Health:
    device: DeviceProcess
    lu: str
    witness: RawNbd
    log_start: int

    @property
    def port(self) -> int:
        return self.device.nbd_port

    def check(self) -> None:
        """The device still serves new and old connections, and logged no crash."""
        offset = HEALTH_AREA + 4096 * int.from_bytes(os.urandom(1), "big")
        with open_export(self.port, self.lu) as fresh:
            one, two = os.urandom(4096), os.urandom(4096)
            assert fresh.write(offset, one) == 0
            assert self.witness.read(offset, 4096) == (0, one)
            assert self.witness.write(offset, two) == 0
            assert fresh.read(offset, 4096) == (0, two)
            fresh.disconnect()
        log = self.device.log_text()[self.log_start :]
        assert "Traceback" not in log and "connection failed" not in log, log[-4000:]


@pytest.fixture(scope="module")
def witness(device: DeviceProcess, lu: str) -> Iterator[RawNbd]:
    """One connection kept open through every bad case of the module."""
    c = open_export(device.nbd_port, lu)
    yield c
    c.close()


@pytest.fixture
def health(device: DeviceProcess, lu: str, witness: RawNbd) -> Health:
    return Health(device, lu, witness, len(device.log_text()))


@pytest.fixture
def conn(device: DeviceProcess, lu: str) -> Iterator[RawNbd]:
    """A connection in transmission with simple replies."""
    c = open_export(device.nbd_port, lu)
    yield c
    c.close()


def fill(c: RawNbd, offset: int, length: int) -> bytes:
    """Write fresh random bytes at ``offset`` and return them."""
    data = os.urandom(length)
    assert c.write(offset, data) == 0
    return data


def in_sync(c: RawNbd, offset: int, expected: bytes) -> None:
    """The connection still frames replies correctly: a read returns what is there."""
    assert c.read(offset, len(expected)) == (0, expected)



# ---------------------------------------------------------------- handshake


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(b"GARB", id="garbage"),
        pytest.param(b"\xff\xff\xff\xff", id="all-ones", marks=()),
        pytest.param(r.u32(r.C_FIXED_NEWSTYLE | 1 << 2), id="unknown-bit2",
                     marks=()),
    ],
)
def test_bad_client_flags_close_the_connection(health: Health, flags: bytes) -> None:
    # proto.md: "the server MUST drop the TCP connection if the client sets an unknown flag"
    with RawNbd(health.port) as c:
        c.read_greeting()
        c.send(flags + struct.pack(">QII", r.IHAVEOPT, r.OPT_LIST, 0))
        with pytest.raises(Closed):
            reply = c.read_option_reply()
            pytest.fail(f"server answered an option after client flags {flags!r}: {reply}")
    health.check()


def test_bad_option_magic_closes_the_connection(health: Health) -> None:
    with RawNbd(health.port).start() as c:
        c.send(struct.pack(">QII", 0x49484156454F5055, r.OPT_LIST, 0))
        assert c.read_until_closed() == b""
    health.check()


def test_unknown_option_is_refused_and_negotiation_goes_on(health: Health) -> None:
    with RawNbd(health.port).start() as c:
        for opt, data in [(0x1234, b"some data"), (4, b""), (0xFFFF_FFFF, bytes(MiB // 16))]:
            [reply] = c.option(opt, data)
            assert (reply.option, reply.type) == (opt, r.REP_ERR_UNSUP)
        replies = c.go(health.lu, r.INFO_BLOCK_SIZE)
        assert replies[-1].type == r.REP_ACK
        assert c.size == 64 * MiB
        expected = fill(c, 8 * MiB, 4096)
        in_sync(c, 8 * MiB, expected)
    health.check()


@pytest.mark.parametrize("opt", [r.OPT_GO, r.OPT_INFO])
def test_unknown_export_is_refused_and_negotiation_goes_on(health: Health, opt: int) -> None:
    with RawNbd(health.port).start() as c:
        replies = c.option(opt, r.go_data("no-such-export", r.INFO_BLOCK_SIZE))
        # One final ERR_UNKNOWN and (SHOULD NOT) no NBD_REP_INFO before it.
        assert [x.type for x in replies] == [r.REP_ERR_UNKNOWN]
        assert replies[-1].data.decode()  # an error message, valid UTF-8
        assert c.go(health.lu)[-1].type == r.REP_ACK
        assert c.read(0, 512)[0] == 0
    health.check()


def test_option_error_message_is_at_most_4096_bytes(health: Health) -> None:
    with RawNbd(health.port).start() as c:
        [reply] = c.go("n" * 4096)
        assert reply.type == r.REP_ERR_UNKNOWN
        assert len(reply.data) <= 4096
    health.check()


def test_export_name_of_unknown_export_closes_the_connection(health: Health) -> None:
    # NBD_OPT_EXPORT_NAME cannot be refused with an error: the server MUST terminate.
    with RawNbd(health.port).start() as c:
        c.send_option(r.OPT_EXPORT_NAME, b"no-such-export")
        assert c.read_until_closed() == b""
    health.check()


def test_export_name_of_known_export_enters_transmission(health: Health) -> None:
    # Control for the test above: the same path with a real name works.
    with RawNbd(health.port).start(r.C_FIXED_NEWSTYLE) as c:
        c.send_option(r.OPT_EXPORT_NAME, health.lu.encode())
        size, flags = struct.unpack(">QH", c.recv_exact(10))
        assert c.recv_exact(124) == bytes(124)  # no NO_ZEROES: the padding is sent
        assert size == 64 * MiB and flags & 1
        assert c.read(0, 512)[0] == 0
    health.check()


@pytest.mark.parametrize("opt", [r.OPT_SET_META_CONTEXT, r.OPT_LIST_META_CONTEXT])
def test_meta_context_before_structured_reply_is_invalid(health: Health, opt: int) -> None:
    with RawNbd(health.port).start() as c:
        [reply] = c.option(opt, r.meta_context_data(health.lu, "base:allocation"))
        assert reply.type == r.REP_ERR_INVALID
        # Negotiation goes on, and in the right order it works.
        c.structured_reply()
        assert c.set_meta_context(health.lu, "base:allocation")
        assert c.go(health.lu)[-1].type == r.REP_ACK
    health.check()


MALFORMED_GO = [
    pytest.param(b"", id="empty"),
    pytest.param(r.u32(100) + b"abc" + b"\x00\x00", id="name-length-past-end"),
    pytest.param(r.nbd_string("abc"), id="no-request-count"),
    pytest.param(r.nbd_string("abc") + b"\x00\x03\x00\x01", id="requests-past-end"),
    pytest.param(r.go_data("abc") + b"\x00", id="trailing-byte"),
    pytest.param(r.go_data(b"ab\x00c"), id="nul-in-name"),
    pytest.param(r.go_data(b"\xc3\x28"), id="bad-utf8"),
]


@pytest.mark.parametrize("data", MALFORMED_GO)
def test_malformed_go_is_invalid_and_negotiation_goes_on(health: Health, data: bytes) -> None:
    with RawNbd(health.port).start() as c:
        replies = c.option(r.OPT_GO, data)
        assert [x.type for x in replies] == [r.REP_ERR_INVALID]
        assert c.go(health.lu)[-1].type == r.REP_ACK
        assert c.read(0, 512)[0] == 0
    health.check()


def test_send_df_is_clear_without_structured_replies(health: Health) -> None:
    send_df = 1 << 7
    with RawNbd(health.port).start() as c:
        assert c.go(health.lu)[-1].type == r.REP_ACK
        assert not c.transmission_flags & send_df, hex(c.transmission_flags)
    health.check()


def test_failed_set_meta_context_clears_earlier_contexts(health: Health) -> None:
    with RawNbd(health.port).start() as c:
        c.structured_reply()
        assert c.set_meta_context(health.lu, "base:allocation")
        [reply] = c.option(r.OPT_SET_META_CONTEXT,
                           r.meta_context_data("no-such-export", "base:allocation"))
        assert reply.type == r.REP_ERR_UNKNOWN
        assert c.go(health.lu)[-1].type == r.REP_ACK
        # No context is selected any more, so block status has nothing to report.
        cookie = c.send_request(r.CMD_BLOCK_STATUS, 0, 4096)
        chunks = c.read_chunks(cookie)
        assert chunks[0].type == r.REPLY_TYPE_ERROR, chunks
    health.check()


# ---------------------------------------------------------------- transmission


@pytest.mark.parametrize("typ", [8, 99, 0x4D50, 0xFFFF])
def test_unknown_command_is_einval(health: Health, conn: RawNbd, typ: int) -> None:
    expected = fill(conn, 9 * MiB, 4096)
    # A length on an unknown command must not make the server wait for a payload.
    assert conn.command(typ, 9 * MiB, 4096) == r.EINVAL
    in_sync(conn, 9 * MiB, expected)
    health.check()


@pytest.mark.parametrize(
    "typ, flags",
    [
        (r.CMD_READ, r.CMD_FLAG_REQ_ONE),
        (r.CMD_FLUSH, r.CMD_FLAG_DF),
        (r.CMD_TRIM, r.CMD_FLAG_NO_HOLE),
        (r.CMD_CACHE, r.CMD_FLAG_REQ_ONE),
    ],
)
def test_flag_not_valid_for_the_command_is_einval(health: Health, conn: RawNbd, typ: int,
                                                  flags: int) -> None:
    expected = fill(conn, 10 * MiB, 4096)
    assert conn.command(typ, 10 * MiB, 4096, flags) == r.EINVAL
    in_sync(conn, 10 * MiB, expected)  # nothing trimmed, and no read data sent
    health.check()


def test_write_with_invalid_flag_is_einval_and_writes_nothing(health: Health,
                                                              conn: RawNbd) -> None:
    expected = fill(conn, 11 * MiB, 4096)
    assert conn.write(11 * MiB, b"\xee" * 4096, flags=r.CMD_FLAG_DF) == r.EINVAL
    in_sync(conn, 11 * MiB, expected)  # the payload was consumed, not applied
    health.check()


@pytest.mark.parametrize(
    "typ, flags", [(r.CMD_FLUSH, 1 << 5), (r.CMD_READ, 1 << 15), (r.CMD_TRIM, 1 << 9)]
)
def test_unknown_flag_is_einval(health: Health, conn: RawNbd, typ: int, flags: int) -> None:
    # proto.md: "The server SHOULD return NBD_EINVAL if it receives an unknown command flag."
    expected = fill(conn, 12 * MiB, 4096)
    length = 0 if typ == r.CMD_FLUSH else 4096
    assert conn.command(typ, 12 * MiB if length else 0, length, flags) == r.EINVAL
    in_sync(conn, 12 * MiB, expected)
    health.check()


@pytest.mark.parametrize(
    "offset, length",
    [(64 * MiB - 4096, 8192), (64 * MiB, 512), (2**64 - 512, 1024)],
    ids=["straddling", "at-end", "offset-wraps"],
)
def test_read_beyond_end_is_einval(health: Health, conn: RawNbd, offset: int,
                                   length: int) -> None:
    tail = fill(conn, conn.size - 4096, 4096)
    assert conn.command(r.CMD_READ, offset, length) == r.EINVAL
    in_sync(conn, conn.size - 4096, tail)  # no data followed the error reply
    health.check()


@pytest.mark.parametrize(
    "offset, length",
    [(64 * MiB - 4096, 8192), (64 * MiB, 512), (2**64 - 2048, 4096)],
    ids=["straddling", "at-end", "offset-wraps"],
)
def test_write_beyond_end_is_enospc_and_writes_nothing(health: Health, conn: RawNbd,
                                                       offset: int, length: int) -> None:
    tail = fill(conn, conn.size - 4096, 4096)
    assert conn.write(offset, b"\xbb" * length) == r.ENOSPC
    in_sync(conn, conn.size - 4096, tail)
    health.check()


def test_write_zeroes_beyond_end_is_enospc_and_zeroes_nothing(health: Health,
                                                              conn: RawNbd) -> None:
    tail = fill(conn, conn.size - 4096, 4096)
    assert conn.command(r.CMD_WRITE_ZEROES, conn.size - 4096, 8192) == r.ENOSPC
    in_sync(conn, conn.size - 4096, tail)
    health.check()


def test_trim_beyond_end_is_einval_and_trims_nothing(health: Health, conn: RawNbd) -> None:
    tail = fill(conn, conn.size - 4096, 4096)
    assert conn.command(r.CMD_TRIM, conn.size - 4096, 8192) == r.EINVAL
    in_sync(conn, conn.size - 4096, tail)
    health.check()


def test_read_over_max_payload_is_refused(health: Health, conn: RawNbd) -> None:
    expected = fill(conn, 13 * MiB, 4096)
    # Simple replies cannot carry it at all; which error is not pinned by the spec.
    assert conn.command(r.CMD_READ, 0, MAX_PAYLOAD + 4096) in (r.EOVERFLOW, r.EINVAL)
    in_sync(conn, 13 * MiB, expected)
    health.check()


def test_write_over_max_payload_is_refused_and_connection_goes_on(health: Health,
                                                                  conn: RawNbd) -> None:
    # The device drains an oversized (but not absurd) payload and answers with an error.
    expected = fill(conn, 0, 4096)
    length = MAX_PAYLOAD + 4096
    cookie = conn.send_request(r.CMD_WRITE, 0, length, data=b"\xcc" * length)
    assert conn.read_simple_reply(cookie) == r.EINVAL
    in_sync(conn, 0, expected)
    assert conn.read(MAX_PAYLOAD, 4096) != (0, b"\xcc" * 4096)
    health.check()


def test_write_with_absurd_length_closes_the_connection(health: Health, conn: RawNbd) -> None:
    # 4 GiB - 1 of payload announced and never sent: the device may not wait for it.
    conn.send_request(r.CMD_WRITE, 0, 0xFFFF_FFFF, data=b"\xdd" * 4096)
    assert conn.read_until_closed() == b""
    health.check()


@pytest.mark.parametrize(
    "magic", [0, 0x12560953, r.SIMPLE_REPLY_MAGIC, r.REQUEST_MAGIC ^ 1],
    ids=["zero", "historic", "reply-magic", "one-bit-off"],
)
def test_bad_request_magic_closes_the_connection(health: Health, conn: RawNbd,
                                                 magic: int) -> None:
    conn.send_request(r.CMD_READ, 0, 512, magic=magic)
    assert conn.read_until_closed() == b""
    health.check()


def test_disconnect_mid_payload_writes_nothing(health: Health, device: DeviceProcess,
                                               conn: RawNbd) -> None:
    offset, length = 14 * MiB, 256 * 1024
    before = fill(conn, offset, length)
    port = conn.sock.getsockname()[1]
    conn.send_request(r.CMD_WRITE, offset, length, data=b"\x5a" * (length // 2))
    conn.close()
    # Once the device has dropped that connection, a partial write would be visible.
    line = f"client disconnected peer=127.0.0.1:{port} "
    wait_until(lambda: line in device.log_text(), what=repr(line))
    with open_export(health.port, health.lu) as check:
        assert check.read(offset, length) == (0, before)
    health.check()


def test_block_status_without_structured_replies_is_einval(health: Health,
                                                           conn: RawNbd) -> None:
    expected = fill(conn, 15 * MiB, 4096)
    assert conn.command(r.CMD_BLOCK_STATUS, 0, 4096) == r.EINVAL
    in_sync(conn, 15 * MiB, expected)
    health.check()


def test_block_status_without_meta_context_is_einval(health: Health) -> None:
    with open_export(health.port, health.lu, structured=True) as c:
        cookie = c.send_request(r.CMD_BLOCK_STATUS, 0, 4096)
        chunks = c.read_chunks(cookie)
        assert len(chunks) == 1 and chunks[0].type == r.REPLY_TYPE_ERROR, chunks
        assert chunks[0].error()[0] == r.EINVAL
    # Control: with a context selected the same request succeeds.
    with open_export(health.port, health.lu, structured=True,
                     contexts=("base:allocation",)) as c:
        cookie = c.send_request(r.CMD_BLOCK_STATUS, 0, 4096)
        types = [ch.type for ch in c.read_chunks(cookie)]
        assert r.REPLY_TYPE_BLOCK_STATUS in types and r.REPLY_TYPE_ERROR not in types
    health.check()


# ---------------------------------------------------------------- structured read errors


def check_error_chunk(chunks: list[r.Chunk], errno: int) -> None:
    """A read refused under structured replies: error chunk(s), no data, DONE at the end."""
    assert chunks[-1].done
    assert all(ch.type not in (r.REPLY_TYPE_OFFSET_DATA, r.REPLY_TYPE_OFFSET_HOLE)
               for ch in chunks), chunks
    errors = [ch for ch in chunks if ch.type == r.REPLY_TYPE_ERROR]
    assert len(errors) == 1, chunks
    err, message = errors[0].error()
    assert err == errno
    (msg_len,) = struct.unpack(">H", errors[0].payload[4:6])
    assert msg_len <= len(errors[0].payload) - 6 and msg_len <= 4096
    assert message


@pytest.mark.parametrize(
    "offset, length, flags, errno",
    [
        (64 * MiB - 512, 1024, 0, r.EINVAL),
        (0, 4096, r.CMD_FLAG_REQ_ONE, r.EINVAL),
        (0, MAX_PAYLOAD + 512, 0, r.EOVERFLOW),
    ],
    ids=["beyond-end", "bad-flag", "over-max"],
)
def test_read_errors_use_error_chunks_once_structured(health: Health, offset: int,
                                                      length: int, flags: int,
                                                      errno: int) -> None:
    # proto.md: with structured replies the server MUST NOT use a simple reply for
    # NBD_CMD_READ, "even for the case of an early NBD_EINVAL due to bad flags".
    with open_export(health.port, health.lu, structured=True) as c:
        cookie = c.send_request(r.CMD_READ, offset, length, flags)
        check_error_chunk(c.read_chunks(cookie), errno)
        # Still in step: a good read comes back as data chunks.
        cookie = c.send_request(r.CMD_READ, 0, 4096)
        chunks = c.read_chunks(cookie)
        assert sum(len(ch.payload) - 8 for ch in chunks
                   if ch.type == r.REPLY_TYPE_OFFSET_DATA) == 4096
    health.check()
