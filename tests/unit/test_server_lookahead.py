"""Which buffered request a connection may admit ahead of carrying out the ones before it."""

from __future__ import annotations

import socket
import threading

import pytest

from mirrorpool.nbd import codec as c
from mirrorpool.nbd.codec import REQUEST_HEADER
from mirrorpool.nbd.constants import REQUEST_MAGIC, Cmd
from mirrorpool.nbd.server import MAX_PAYLOAD, SLOW_COPIED_WRITE, Connection, _whole_mutation


def _request(cmd: int, length: int, payload: int = 0) -> bytes:
    return REQUEST_HEADER.pack(REQUEST_MAGIC, 0, cmd, 1, 0, length) + bytes(payload)


def _whole(data: bytes, start: int = 0) -> bool:
    return _whole_mutation(memoryview(data), start, len(data))


def test_a_write_counts_only_with_all_of_its_payload() -> None:
    assert _whole(_request(Cmd.WRITE, 4096, 4096))
    assert not _whole(_request(Cmd.WRITE, 4096, 4095))
    assert not _whole(_request(Cmd.WRITE, 4096)[:27])  # not even the header
    assert _whole(b"junk" + _request(Cmd.WRITE, 512, 512), start=4)


def test_zeroes_and_trims_count_reads_flushes_and_triggers_do_not() -> None:
    assert _whole(_request(Cmd.WRITE_ZEROES, 1 << 20))
    assert _whole(_request(Cmd.TRIM, 1 << 20))
    for cmd in (Cmd.READ, Cmd.FLUSH, Cmd.TRIGGER, Cmd.DISC, Cmd.BLOCK_STATUS):
        assert not _whole(_request(cmd, 4096, 4096))


def test_writes_served_by_helpers_never_count() -> None:
    big = SLOW_COPIED_WRITE
    assert not _whole(_request(Cmd.WRITE, big, big))


class _Export:
    """Admits every request; carrying one out fails with OSError where told to."""

    name = "x"
    lu = None
    admits_ahead = True
    writes_copied = False

    def __init__(self, failing: set[int]) -> None:
        self.failing = failing
        self.admitted: list[int] = []
        self.carried_out: list[int] = []

    def admit(self, cmd: object, payload: memoryview) -> object:
        self.admitted.append(cmd.offset // 4096)  # type: ignore[attr-defined]
        return cmd

    def write(self, ticket: object, data: memoryview, offset: int, fua: bool) -> None:
        self.carried_out.append(offset // 4096)
        if offset // 4096 in self.failing:
            raise OSError(5, "journal sync failed")


def _connection(export: _Export) -> tuple[object, socket.socket]:
    """A connection in the transmission phase over a socket pair, as after negotiation."""
    ours, theirs = socket.socketpair()
    conn = Connection.__new__(Connection)
    conn.sock, conn.peer, conn.export = ours, "test", export
    conn.codec = c.ServerCodec()
    conn.codec.state = c.State.TRANSMISSION
    conn.limits = c.ExportLimits(size=1 << 30, read_only=False, max_payload=MAX_PAYLOAD,
                                 structured_replies=False)
    conn._send_lock, conn._busy_lock = threading.Lock(), threading.Lock()
    conn._closing, conn._pending, conn._helpers_busy, conn._stats = False, b"", 0, {}
    conn._recv_sleeping = conn._recv_polled = ours.recv_into
    return conn, theirs


def test_requests_admitted_ahead_are_all_carried_out_when_one_of_them_fails() -> None:
    """A failure while serving those admitted ahead (here an OSError, as a FUA write's
    journal sync could raise) must not leave the ones behind it admitted and never
    carried out: their sequencer operations would hold back every later one."""
    export = _Export(failing={0, 1})
    conn, peer = _connection(export)
    burst = b"".join(_request(Cmd.WRITE, 4096, 4096)[:16]
                     + (i * 4096).to_bytes(8, "big") + (4096).to_bytes(4, "big") + bytes(4096)
                     for i in range(5))
    peer.sendall(burst + b"\0" * 28)  # then a header the codec refuses (bad magic)
    with pytest.raises((OSError, c.ProtocolError)):
        conn._read_loop()  # type: ignore[attr-defined]
    # 0-3 were admitted ahead; 4, behind the failure, is not admitted at all
    assert export.admitted == [0, 1, 2, 3]
    assert export.carried_out == export.admitted
    peer.close()
