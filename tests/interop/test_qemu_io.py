"""qemu-io against every target: verified patterns, zeroes, discard, FUA, flush."""

from __future__ import annotations

import pytest

from tests.conftest import Target, need
from tests.interop.support import run


@pytest.fixture(autouse=True)
def _programs() -> None:
    need("qemu-io")


def qemu_io(target: Target, *commands: str) -> str:
    """Run qemu-io commands in one session; fail on any failed command or verification."""
    args = ["qemu-io", "-f", "raw", target.uri]
    for command in commands:
        args += ["-c", command]
    result = run(args, timeout=60, check=False)
    out = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, out
    assert "verification failed" not in out, out
    assert "failed" not in out, out
    return out


def test_pattern_writes_and_verified_reads(target: Target) -> None:
    qemu_io(
        target,
        "write -P 0x11 0 64k",
        "write -P 0x22 64k 1M",
        "write -P 0x33 1000 3001",  # unaligned head and tail
        "write -P 0x44 63M 1M",  # last MiB of the export
        "read -P 0x11 0 1000",
        "read -P 0x33 1000 3001",
        "read -P 0x11 4001 61535",
        "read -P 0x22 64k 1M",
        "read -P 0 1088k 1M",
        "read -P 0x44 63M 1M",
    )


def test_verified_read_catches_a_wrong_pattern(target: Target) -> None:
    """Calibrates `read -P`: a mismatch makes qemu-io report it and exit non-zero."""
    qemu_io(target, "write -P 0x5a 0 4k")
    result = run(["qemu-io", "-f", "raw", target.uri, "-c", "read -P 0x5b 0 4k"], check=False)
    assert result.returncode != 0
    assert b"Pattern verification failed" in result.stdout + result.stderr


def test_vectored_and_async_writes(target: Target) -> None:
    qemu_io(
        target,
        "writev -P 0x61 1M 4k 8k 12k",
        "aio_write -P 0x62 2M 64k",
        "aio_write -P 0x63 3M 64k",
        "aio_write -P 0x64 4M 64k",
        "aio_flush",
        "readv -P 0x61 1M 12k 12k",
        "read -P 0x62 2M 64k",
        "read -P 0x63 3M 64k",
        "read -P 0x64 4M 64k",
    )


def test_write_zeroes_reads_zero(target: Target) -> None:
    qemu_io(
        target,
        "write -P 0x77 0 4M",
        "write -z 1M 1M",
        "write -z 2097664 3584",  # sub-block, unaligned
        "read -P 0x77 0 1M",
        "read -P 0 1M 1M",
        "read -P 0x77 2M 512",
        "read -P 0 2097664 3584",
        "read -P 0x77 2101248 2093056",
    )


def test_write_zeroes_with_unmap_reads_zero(target: Target) -> None:
    qemu_io(
        target,
        "write -P 0x78 0 4M",
        "write -z -u 1M 2M",
        "write -z -u 3145828 1000",
        "read -P 0x78 0 1M",
        "read -P 0 1M 2M",
        "read -P 0x78 3M 100",
        "read -P 0 3145828 1000",
        "read -P 0x78 3146828 1047476",
    )


def test_discard_reads_zero(target: Target) -> None:
    # NBD lets a trimmed range read back as anything; both servers here promise zeros.
    qemu_io(
        target,
        "write -P 0x79 0 4M",
        "discard 1M 2M",
        "read -P 0x79 0 1M",
        "read -P 0 1M 2M",
        "read -P 0x79 3M 1M",
    )


def test_fua_writes_and_flush(target: Target) -> None:
    qemu_io(
        target,
        "write -f -P 0x81 0 1M",
        "write -f -P 0x82 1M 4k",
        "write -f -z 2M 64k",
        "write -P 0x83 3M 64k",
        "flush",
        "read -P 0x81 0 1M",
        "read -P 0x82 1M 4k",
        "read -P 0 2M 64k",
        "read -P 0x83 3M 64k",
    )
    # A new connection (a new qemu-io) sees the same data.
    qemu_io(target, "read -P 0x81 0 1M", "read -P 0x82 1M 4k", "read -P 0x83 3M 64k")
