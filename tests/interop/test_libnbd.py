"""libnbd (the `nbd` Python module) against every target.

Commands one by one and pipelined, block status, several connections at once,
requests out of range, and clients that vanish without NBD_CMD_DISC.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import Target
from tests.helpers.processes import DeviceProcess
from tests.interop.support import (
    HOLE,
    ZERO,
    KiB,
    MiB,
    Run,
    assert_flags,
    check_coverage,
    lu_name,
    random_bytes,
    wait_until,
)

try:
    import nbd
except ImportError:  # python3-libnbd is a Debian package, not a wheel
    if os.environ.get("CI"):
        raise
    pytest.skip("the nbd module (python3-libnbd) is not installed", allow_module_level=True)


Connect = Callable[..., "nbd.NBD"]
# how nbdkit 1.32.5 aborts when a connection is pulled while it still owes replies
NBDKIT_SEND_ABORT = "raw_send_socket: Assertion `sock >= 0' failed"


@pytest.fixture
def connect(target: Target) -> Iterator[Connect]:
    """Open libnbd handles to the target; all are disconnected cleanly at the end."""
    handles: list[nbd.NBD] = []

    def open_handle(*, structured: bool = True, meta: bool = True,
                    uri: str | None = None) -> nbd.NBD:
        h = nbd.NBD()
        h.set_request_structured_replies(structured)
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(uri or target.uri)
        handles.append(h)
        return h

    yield open_handle
    for h in handles:
        with contextlib.suppress(nbd.Error):  # a handle a test broke on purpose
            h.shutdown()


def block_status(h: nbd.NBD, offset: int, count: int, flags: int = 0) -> list[Run]:
    """One BLOCK_STATUS request for base:allocation, as runs from `offset`."""
    replies: list[tuple[int, list[int]]] = []

    def extent(context: str, start: int, entries: list[int], err: object) -> int:
        if context == nbd.CONTEXT_BASE_ALLOCATION:
            replies.append((start, list(entries)))
        return 0

    h.block_status(count, offset, extent, flags)
    assert len(replies) == 1, f"base:allocation answered {len(replies)} times"
    start, entries = replies[0]
    assert start == offset
    assert entries and len(entries) % 2 == 0, entries
    runs = []
    pos = start
    for length, state in zip(entries[0::2], entries[1::2], strict=True):
        assert length > 0, entries
        runs.append(Run(pos, length, state))
        pos += length
    return runs


def allocation_map(h: nbd.NBD) -> list[Run]:
    """The whole export's base:allocation map, asking again where the server stops short."""
    size = h.get_size()
    runs: list[Run] = []
    pos = 0
    while pos < size:
        part = block_status(h, pos, size - pos)
        for r in part:
            end = min(r.end, size)
            if end > r.offset:
                runs.append(Run(r.offset, end - r.offset, r.flags))
        pos = runs[-1].end
    return runs


def wait_all(h: nbd.NBD, cookies: list[int], timeout: float = 30) -> None:
    """Drive the handle until every command has completed; a failed one raises."""
    pending = set(cookies)
    deadline = time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} commands still in flight"
        for cookie in list(pending):
            if h.aio_command_completed(cookie):
                pending.discard(cookie)
        if pending:
            h.poll(1000)


def expect_errno(fn: Callable[[], object]) -> int:
    """The errno a request failed with (0 if it succeeded, EPROTO if libnbd gave none)."""
    try:
        fn()
    except nbd.Error as exc:
        return exc.errnum or errno.EPROTO
    return 0


def lu_connections(device: DeviceProcess, target: Target) -> int:
    status, body = device.request("GET", f"/v1/lus/{lu_name(target)}")
    assert status == 200, body
    return body["connections"]


# ---------------------------------------------------------------- one command at a time


def test_negotiation(connect: Connect, target: Target) -> None:
    h = connect()
    assert h.get_size() == target.size
    assert h.get_structured_replies_negotiated()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    for can in (h.can_flush, h.can_fua, h.can_trim, h.can_zero, h.can_fast_zero,
                h.can_multi_conn, h.can_cache, h.can_df):
        assert can(), can.__name__
    assert not h.is_read_only()


def test_pread_pwrite(connect: Connect, target: Target) -> None:
    h = connect()
    data = random_bytes(1 * MiB + 333, seed=31)
    h.pwrite(data, 3 * MiB + 123)
    assert h.pread(len(data), 3 * MiB + 123) == data
    # Unaligned reads that straddle the written range see zeros around it.
    got = h.pread(4096, 3 * MiB + 123 - 1000)
    assert got == bytes(1000) + data[:3096]
    tail = target.size - 4096
    h.pwrite(data[:4096], tail)
    assert h.pread(4096, tail) == data[:4096]
    assert h.pread(1, target.size - 1) == data[4095:4096]
    # A second connection sees the same bytes.
    assert connect().pread(len(data), 3 * MiB + 123) == data


def test_read_with_df_flag(connect: Connect) -> None:
    h = connect()
    data = random_bytes(256 * KiB, seed=32)
    h.pwrite(data, 0)
    chunks: list[tuple[int, int, int]] = []

    def chunk(sub: bytes, offset: int, status: int, err: object) -> int:
        chunks.append((offset, len(sub), status))
        return 0

    assert h.pread_structured(len(data), 0, chunk, nbd.CMD_FLAG_DF) == data
    # DF: the server must answer in one piece.
    assert chunks == [(0, len(data), nbd.READ_DATA)]


def test_zero_variants_read_zero(connect: Connect) -> None:
    h = connect()
    h.pwrite(b"\xa5" * (6 * MiB), 0)
    h.zero(1 * MiB, 0)
    h.zero(1 * MiB, 1 * MiB, nbd.CMD_FLAG_NO_HOLE)
    h.zero(1 * MiB, 2 * MiB, nbd.CMD_FLAG_FUA)
    code = expect_errno(lambda: h.zero(1 * MiB, 3 * MiB, nbd.CMD_FLAG_FAST_ZERO))
    assert code in (0, errno.ENOTSUP), os.strerror(code)  # fast zero may refuse, nothing else
    if code:
        assert h.pread(1 * MiB, 3 * MiB) == b"\xa5" * MiB, "a refused fast zero changed data"
        h.zero(1 * MiB, 3 * MiB)
    h.zero(1000, 4 * MiB + 100)  # unaligned, inside data
    assert h.pread(4 * MiB, 0) == bytes(4 * MiB)
    assert h.pread(100, 4 * MiB) == b"\xa5" * 100
    assert h.pread(1000, 4 * MiB + 100) == bytes(1000)
    assert h.pread(2 * MiB - 1100, 4 * MiB + 1100) == b"\xa5" * (2 * MiB - 1100)


def test_trim_reads_zero(connect: Connect) -> None:
    # NBD lets trimmed data read back as anything; both servers here promise zeros.
    h = connect()
    h.pwrite(b"\x5a" * (4 * MiB), 0)
    h.trim(1 * MiB, 0)
    h.trim(1 * MiB, 2 * MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(1 * MiB, 0) == bytes(MiB)
    assert h.pread(1 * MiB, 1 * MiB) == b"\x5a" * MiB
    assert h.pread(1 * MiB, 2 * MiB) == bytes(MiB)
    assert h.pread(1 * MiB, 3 * MiB) == b"\x5a" * MiB


def test_fua_write_flush_and_cache(connect: Connect) -> None:
    h = connect()
    data = random_bytes(2 * MiB, seed=33)
    h.pwrite(data[:MiB], 0, nbd.CMD_FLAG_FUA)
    h.pwrite(data[MiB:], MiB)
    h.flush()
    h.cache(2 * MiB, 0)
    assert h.pread(2 * MiB, 0) == data
    other = connect()
    other.flush()
    assert other.pread(2 * MiB, 0) == data


# ---------------------------------------------------------------- block status


def test_block_status_base_allocation(connect: Connect, target: Target) -> None:
    h = connect()
    runs = allocation_map(h)
    check_coverage(runs, target.size)
    assert_flags(runs, 0, target.size, hole=True, zero=True)

    h.pwrite(random_bytes(MiB, seed=34), 1 * MiB)
    h.pwrite(random_bytes(MiB, seed=35), 4 * MiB)
    h.pwrite(random_bytes(MiB, seed=36), 8 * MiB)
    h.trim(1 * MiB, 4 * MiB)
    h.zero(1 * MiB, 8 * MiB)
    runs = allocation_map(h)
    check_coverage(runs, target.size)
    assert_flags(runs, 0, 1 * MiB, hole=True, zero=True)
    assert_flags(runs, 1 * MiB, 2 * MiB, hole=False, zero=False)  # random data: never ZERO
    assert_flags(runs, 2 * MiB, 4 * MiB, hole=True, zero=True)
    assert_flags(runs, 4 * MiB, 5 * MiB, hole=True, zero=True)  # trimmed
    assert_flags(runs, 8 * MiB, 9 * MiB, zero=True)  # zeroed: hole or not, it reads zero
    assert_flags(runs, 9 * MiB, target.size, hole=True, zero=True)


def test_block_status_req_one_and_unaligned_start(connect: Connect, target: Target) -> None:
    h = connect()
    h.pwrite(random_bytes(2 * MiB, seed=37), 2 * MiB)
    one = block_status(h, 0, target.size, nbd.CMD_FLAG_REQ_ONE)
    assert len(one) == 1
    assert one[0].length <= target.size
    assert one[0].flags & (HOLE | ZERO) == HOLE | ZERO
    assert one[0].end <= 2 * MiB  # it describes the hole only

    inside = block_status(h, 2 * MiB + 100, 4096, nbd.CMD_FLAG_REQ_ONE)
    assert len(inside) == 1 and inside[0].offset == 2 * MiB + 100
    assert inside[0].length <= 4096  # REQ_ONE: the extent may not exceed the request
    assert inside[0].flags & (HOLE | ZERO) == 0

    # Without REQ_ONE, a short request starting in data is answered from there.
    runs = block_status(h, 4 * MiB - 512, 1024)
    assert runs[0].flags & (HOLE | ZERO) == 0
    assert all(r.flags & HOLE for r in runs[1:]), runs


def test_structured_replies_off(connect: Connect, target: Target) -> None:
    h = connect(structured=False)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    data = random_bytes(MiB, seed=38)
    h.pwrite(data, 5 * MiB)
    assert h.pread(MiB, 5 * MiB) == data
    h.set_strict_mode(0)
    # A failed read with simple replies carries no data; the stream must stay in step.
    assert expect_errno(lambda: h.pread(8192, target.size - 4096)) == errno.EINVAL
    assert h.pread(MiB, 5 * MiB) == data
    assert expect_errno(lambda: h.block_status(4096, 0, lambda *a: 0)) != 0
    assert h.pread(4096, 5 * MiB) == data[:4096]


# ---------------------------------------------------------------- pipelining and multi-conn


def test_pipelined_writes_then_reads(connect: Connect) -> None:
    h = connect()
    count = 64
    # Unaligned, non-overlapping: request i covers [i*100000, i*100000 + 65536 + i).
    chunks = [random_bytes(65536 + i, seed=100 + i) for i in range(count)]
    buffers = [nbd.Buffer.from_bytearray(bytearray(c)) for c in chunks]
    cookies = [h.aio_pwrite(buf, i * 100_000) for i, buf in enumerate(buffers)]
    assert len(set(cookies)) == count
    wait_all(h, cookies)

    reads = [nbd.Buffer(len(c)) for c in chunks]
    cookies = [h.aio_pread(buf, i * 100_000) for i, buf in enumerate(reads)]
    wait_all(h, cookies)
    for i, (buf, chunk) in enumerate(zip(reads, chunks, strict=True)):
        assert buf.to_bytearray() == chunk, f"request {i} read back wrong"
    gap = h.pread(100_000 - 65536 - 10, 10 * 100_000 + 65536 + 10)
    assert gap == bytes(len(gap))


def test_pipelined_mixed_commands(connect: Connect) -> None:
    h = connect()
    base = random_bytes(8 * MiB, seed=40)
    h.pwrite(base, 0)
    new = random_bytes(MiB, seed=41)
    cookies = [
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(new)), 0, flags=nbd.CMD_FLAG_FUA),
        h.aio_zero(MiB, 1 * MiB),
        h.aio_trim(MiB, 2 * MiB),
        h.aio_zero(MiB, 3 * MiB, flags=nbd.CMD_FLAG_NO_HOLE),
        h.aio_cache(MiB, 4 * MiB),
    ]
    read_back = nbd.Buffer(MiB)
    cookies.append(h.aio_pread(read_back, 5 * MiB))
    wait_all(h, cookies)
    wait_all(h, [h.aio_flush()])
    assert read_back.to_bytearray() == base[5 * MiB : 6 * MiB]
    assert h.pread(MiB, 0) == new
    assert h.pread(3 * MiB, MiB) == bytes(3 * MiB)
    assert h.pread(4 * MiB, 4 * MiB) == base[4 * MiB :]


def test_multi_conn_handles_see_each_others_writes(connect: Connect) -> None:
    handles = [connect() for _ in range(4)]
    assert all(h.can_multi_conn() for h in handles)
    regions = {i: (i * 2 * MiB + 777, random_bytes(MiB + 11, seed=50 + i)) for i in range(4)}
    # Every handle writes its own region, all at once, in 64 KiB requests.
    issued: dict[int, list[int]] = {}
    for i, h in enumerate(handles):
        offset, data = regions[i]
        issued[i] = [
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data[p : p + 65536])), offset + p)
            for p in range(0, len(data), 65536)
        ]
    for i, h in enumerate(handles):
        wait_all(h, issued[i])
    handles[0].flush()  # multi-conn: one flush after all replies covers every connection
    for reader in handles:
        for offset, data in regions.values():
            assert reader.pread(len(data), offset) == data

    # Ping-pong: a write on one connection is read at once on another.
    for writer, reader in ((0, 1), (1, 2), (2, 3), (3, 0)):
        stamp = random_bytes(4096, seed=60 + writer)
        handles[writer].pwrite(stamp, 20 * MiB + writer * 4096)
        handles[writer].flush()
        assert handles[reader].pread(4096, 20 * MiB + writer * 4096) == stamp


# ---------------------------------------------------------------- requests out of range


def test_out_of_range_requests_get_server_errors(connect: Connect, target: Target) -> None:
    h = connect()
    marker = random_bytes(4096, seed=70)
    h.pwrite(marker, 0)
    size = target.size

    # libnbd's strict mode refuses these before they leave the client.
    assert expect_errno(lambda: h.pread(4096, size - 512)) == errno.EINVAL
    assert h.pread(4096, 0) == marker

    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
    answers = {
        "pread past end": expect_errno(lambda: h.pread(4096, size - 512)),
        "pread at end": expect_errno(lambda: h.pread(1, size)),
        "pread far away": expect_errno(lambda: h.pread(512, 1 << 50)),
        "pwrite past end": expect_errno(lambda: h.pwrite(b"x" * 4096, size - 512)),
        "pwrite at end": expect_errno(lambda: h.pwrite(b"x", size)),
        "zero past end": expect_errno(lambda: h.zero(4096, size - 512)),
        "trim past end": expect_errno(lambda: h.trim(4096, size - 512)),
        "cache past end": expect_errno(lambda: h.cache(4096, size - 512)),
        "block status at end": expect_errno(lambda: h.block_status(4096, size, lambda *a: 0)),
    }
    assert answers == {
        "pread past end": errno.EINVAL,
        "pread at end": errno.EINVAL,
        "pread far away": errno.EINVAL,
        "pwrite past end": errno.ENOSPC,
        "pwrite at end": errno.ENOSPC,
        "zero past end": errno.ENOSPC,
        "trim past end": errno.EINVAL,
        "cache past end": errno.EINVAL,
        "block status at end": errno.EINVAL,
    }
    # Nothing was written by the refused requests, and the connection is in step.
    assert h.pread(512, size - 512) == bytes(512)
    assert h.pread(4096, 0) == marker


def test_request_over_advertised_maximum_is_refused(connect: Connect) -> None:
    h = connect()
    maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
    if not maximum:
        pytest.skip("the server advertises no maximum block size")
    h.pwrite(b"\x11" * 4096, 0)
    h.set_strict_mode(0)
    too_big = maximum + 4096
    assert expect_errno(lambda: h.pwrite(b"\x22" * too_big, 0)) != 0
    assert h.pread(4096, 0) == b"\x11" * 4096  # the refused write changed nothing
    assert expect_errno(lambda: h.pread(too_big, 0)) != 0
    assert h.pread(4096, 0) == b"\x11" * 4096


def test_zero_length_read_keeps_the_connection(connect: Connect) -> None:
    h = connect()
    h.pwrite(b"\x33" * 4096, 0)
    h.set_strict_mode(0)
    # The spec leaves the answer open (error or empty success) but says: do not disconnect.
    code = expect_errno(lambda: h.pread(0, 0))
    assert code in (0, errno.EINVAL), os.strerror(code)
    assert h.pread(4096, 0) == b"\x33" * 4096


def test_zero_length_requests_keep_the_connection(connect: Connect) -> None:
    h = connect()
    h.pwrite(b"\x44" * 4096, 0)
    h.set_strict_mode(0)
    for name, fn in (("pwrite", lambda: h.pwrite(b"", 0)), ("zero", lambda: h.zero(0, 0)),
                     ("trim", lambda: h.trim(0, 0)), ("cache", lambda: h.cache(0, 0))):
        code = expect_errno(fn)
        assert code in (0, errno.EINVAL, errno.ENOSPC), (name, os.strerror(code))
        assert h.pread(4096, 0) == b"\x44" * 4096, name


def test_zero_length_requests_change_nothing_later(connect: Connect) -> None:
    """After zero-length TRIM and WRITE_ZEROES, trims and fast zeroes behave as before."""

    def trim_leaves_hole(h: nbd.NBD, offset: int) -> bool:
        h.pwrite(b"\x55" * MiB, offset)
        h.trim(MiB, offset)
        return all(r.flags & HOLE for r in block_status(h, offset, MiB))

    def fast_zero_works(h: nbd.NBD, offset: int) -> bool:
        h.pwrite(b"\x66" * MiB, offset)
        ok = expect_errno(lambda: h.zero(MiB, offset, nbd.CMD_FLAG_FAST_ZERO)) == 0
        return ok and h.pread(MiB, offset) == bytes(MiB)

    h = connect()
    before = (trim_leaves_hole(h, 8 * MiB), fast_zero_works(h, 10 * MiB))
    h.set_strict_mode(0)
    expect_errno(lambda: h.trim(0, 4096))
    expect_errno(lambda: h.zero(0, 4096))
    later = connect()  # another connection to the same export
    after = (trim_leaves_hole(later, 12 * MiB), fast_zero_works(later, 14 * MiB))
    assert after == before


# ---------------------------------------------------------------- clients that vanish

_STREAMER = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
buf = nbd.Buffer.from_bytearray(bytearray(b"\x5a" * (1 << 20)))
first, span = 32 << 20, 16 << 20
i = 0
print("streaming", flush=True)
while True:
    while h.aio_in_flight() < 16:
        h.aio_pwrite(buf, first + (i % 16) * (1 << 20), completion=lambda err: 1)
        i += 1
    h.poll(-1)
"""


def _read_line(proc: subprocess.Popen, timeout: float) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the streaming client did not start"
    return proc.stdout.readline()


def _fail_unless_nbdkit_aborted(target: Target, exc: Exception) -> None:
    """Re-raise ``exc`` with the server's state, or xfail on nbdkit's own abort."""
    if target.server_state is None:
        raise exc
    state = target.server_state()
    if NBDKIT_SEND_ABORT in state:
        # nbdkit's own bug (1.32): a thread still replying on a connection whose
        # client went away finds its socket closed and aborts the whole server
        pytest.xfail(f"nbdkit aborted: {state}")
    raise AssertionError(f"{exc} [{state}]") from exc


def test_killed_client_mid_stream(connect: Connect, target: Target, device: DeviceProcess) -> None:
    survivor = connect()
    marker = random_bytes(MiB, seed=80)
    survivor.pwrite(marker, 0)

    proc = subprocess.Popen([sys.executable, "-c", _STREAMER, target.uri],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _read_line(proc, 20) == b"streaming\n", proc.stderr.read() if proc.stderr else ""
        time.sleep(0.5)  # let writes pile up on the wire
        assert proc.poll() is None, "the streaming client died on its own"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # no NBD_CMD_DISC, maybe mid-payload
        proc.wait(10)

    try:
        # The connection that was open all along still works ...
        assert survivor.pread(MiB, 0) == marker
        survivor.pwrite(marker[::-1], MiB)
        # ... and so does a new one, which sees the same data.
        fresh = connect()
        assert fresh.pread(MiB, MiB) == marker[::-1]
        # Whatever of the stream was written is whole bytes of its pattern, never garbage.
        streamed = fresh.pread(16 * MiB, 32 * MiB)
        assert set(streamed) <= {0, 0x5A}
        assert 0x5A in streamed, "none of the streamed writes arrived"
    except (nbd.Error, AssertionError) as exc:
        _fail_unless_nbdkit_aborted(target, exc)
    if target.kind == "mirrorpool":
        wait_until(lambda: lu_connections(device, target) == 2, 10,
                   "the device to drop the killed client's connection")


def test_socket_shut_down_with_requests_in_flight(connect: Connect, target: Target,
                                                 device: DeviceProcess) -> None:
    other = connect()
    victim = connect()
    other.pwrite(b"\x77" * 4096, 0)
    for i in range(8):
        victim.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"\x88" * MiB)), (8 + i) * MiB)
    # Pull the socket from under libnbd: no NBD_CMD_DISC, requests left half sent.
    with socket.socket(fileno=os.dup(victim.aio_get_fd())) as s:
        s.shutdown(socket.SHUT_RDWR)
    with pytest.raises(nbd.Error):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            victim.poll(1000)
            victim.pread(512, 0)

    try:
        assert other.pread(4096, 0) == b"\x77" * 4096
        other.pwrite(b"\x99" * 4096, 4096)
        fresh = connect()
        assert fresh.pread(8192, 0) == b"\x77" * 4096 + b"\x99" * 4096
        assert set(fresh.pread(8 * MiB, 8 * MiB)) <= {0, 0x88}
    except (nbd.Error, AssertionError) as exc:
        _fail_unless_nbdkit_aborted(target, exc)
    if target.kind == "mirrorpool":
        wait_until(lambda: lu_connections(device, target) == 2, 10,
                   "the device to drop the shut-down connection")
