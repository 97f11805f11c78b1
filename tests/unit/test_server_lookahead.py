"""Which buffered request a connection may admit ahead of carrying out the ones before it."""

from __future__ import annotations

from mirrorpool.nbd.codec import REQUEST_HEADER
from mirrorpool.nbd.constants import REQUEST_MAGIC, Cmd
from mirrorpool.nbd.server import SLOW_COPIED_WRITE, _whole_mutation


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
