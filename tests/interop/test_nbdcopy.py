"""nbdcopy against every target: round trips checked with cmp, sparse copies, odd sizes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Target, need
from tests.interop.support import (
    MiB,
    assert_flags,
    check_coverage,
    nbdinfo_map,
    random_bytes,
    run,
)


@pytest.fixture(autouse=True)
def _programs() -> None:
    need("nbdcopy", "nbdinfo", "cmp", "qemu-io")


def cmp(a: Path, b: Path, n: int | None = None) -> None:
    args = ["cmp", *(["-n", str(n)] if n is not None else []), str(a), str(b)]
    run(args, timeout=30)


def test_round_trip_file_export_file(target: Target, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = random_bytes(8 * MiB + 4096, seed=11)
    src.write_bytes(data)
    run(["nbdcopy", "--flush", "--requests=16", str(src), target.uri])
    out = tmp_path / "out.bin"
    run(["nbdcopy", "--requests=16", target.uri, str(out)])
    assert out.stat().st_size == target.size
    cmp(src, out, len(data))
    tail = out.read_bytes()[len(data):]
    assert tail.count(0) == len(tail), "export not zero past the copied file"


def test_round_trip_with_several_connections(target: Target, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(random_bytes(target.size, seed=12))
    run(["nbdcopy", "--connections=4", "--requests=8", str(src), target.uri])
    out = tmp_path / "out.bin"
    run(["nbdcopy", "--connections=4", "--requests=8", target.uri, str(out)])
    cmp(src, out)


def test_cmp_catches_a_changed_byte(target: Target, tmp_path: Path) -> None:
    """Calibrates the round trips: a byte changed on the export makes cmp fail."""
    src = tmp_path / "src.bin"
    data = random_bytes(2 * MiB, seed=13)
    src.write_bytes(data)
    run(["nbdcopy", str(src), target.uri])
    run(["qemu-io", "-f", "raw", target.uri, "-c", f"write -P {data[12345] ^ 0xFF} 12345 1"])
    out = tmp_path / "out.bin"
    run(["nbdcopy", target.uri, str(out)])
    result = run(["cmp", "-n", str(len(data)), str(src), str(out)], check=False)
    assert result.returncode == 1
    assert b"byte 12346" in result.stdout  # cmp counts from 1


def test_unaligned_export_round_trip(target: Target, make_export: Callable[[int], Target],
                                     tmp_path: Path) -> None:
    size = 5 * MiB + 7 * 512  # not a multiple of 1 MiB (mirrorpool LUs are whole sectors)
    odd = make_export(size)
    src = tmp_path / "src.bin"
    src.write_bytes(random_bytes(size, seed=14))
    run(["nbdcopy", "--request-size=1048576", str(src), odd.uri])
    out = tmp_path / "out.bin"
    run(["nbdcopy", "--request-size=1048576", odd.uri, str(out)])
    assert out.stat().st_size == size
    cmp(src, out)


def test_unaligned_file_leaves_the_rest_untouched(target: Target, tmp_path: Path) -> None:
    """A source not even a multiple of 512 bytes: the tail write must not spill over."""
    run(["qemu-io", "-f", "raw", target.uri, "-c", "write -P 0xff 0 4M"])
    n = 1 * MiB + 12345
    src = tmp_path / "src.bin"
    data = random_bytes(n, seed=15)
    src.write_bytes(data)
    run(["nbdcopy", str(src), target.uri])
    out = tmp_path / "out.bin"
    run(["nbdcopy", target.uri, str(out)])
    got = out.read_bytes()
    assert got[:n] == data
    assert got[n : 4 * MiB] == b"\xff" * (4 * MiB - n), "bytes past the source changed"
    assert got[4 * MiB :].count(0) == target.size - 4 * MiB


def _sparse_source(path: Path, size: int) -> dict[int, bytes]:
    """A sparse file with a few data runs; returns them by offset."""
    runs = {
        1 * MiB: random_bytes(1 * MiB, seed=21),
        10 * MiB: random_bytes(256 * 1024, seed=22),
        40 * MiB: random_bytes(2 * MiB, seed=23),
        size - 1 * MiB: random_bytes(1 * MiB, seed=24),
    }
    with path.open("wb") as f:
        f.truncate(size)
        for offset, chunk in runs.items():
            f.seek(offset)
            f.write(chunk)
    return runs


def _check_sparse_map(uri: str, size: int, runs: dict[int, bytes], *, hole: bool | None) -> None:
    extents = nbdinfo_map(uri)
    check_coverage(extents, size)
    pos = 0
    for offset, chunk in sorted(runs.items()):
        if offset > pos:
            assert_flags(extents, pos, offset, hole=hole, zero=True)
        assert_flags(extents, offset, offset + len(chunk), hole=False, zero=False)
        pos = offset + len(chunk)
    if pos < size:
        assert_flags(extents, pos, size, hole=hole, zero=True)


def test_sparse_source_keeps_holes(target: Target, tmp_path: Path) -> None:
    src = tmp_path / "sparse.img"
    runs = _sparse_source(src, target.size)
    assert src.stat().st_blocks * 512 < 8 * MiB, "the file system did not keep the file sparse"
    run(["nbdcopy", str(src), target.uri])
    _check_sparse_map(target.uri, target.size, runs, hole=True)
    out = tmp_path / "out.img"
    run(["nbdcopy", target.uri, str(out)])
    cmp(src, out)


def test_sparse_source_over_old_data_reads_back_exactly(target: Target, tmp_path: Path) -> None:
    """nbdcopy zeroes the holes of the source on a dirty export; they must read as zero."""
    old = tmp_path / "old.img"
    old.write_bytes(random_bytes(target.size, seed=25))
    run(["nbdcopy", str(old), target.uri])
    src = tmp_path / "sparse.img"
    runs = _sparse_source(src, target.size)
    run(["nbdcopy", str(src), target.uri])
    # Zeroed ranges may be holes or allocated zeros: that is the server's choice.
    _check_sparse_map(target.uri, target.size, runs, hole=None)
    out = tmp_path / "out.img"
    run(["nbdcopy", target.uri, str(out)])
    cmp(src, out)


def test_export_to_export_keeps_holes(target: Target, make_export: Callable[[int], Target],
                                      tmp_path: Path) -> None:
    src = tmp_path / "sparse.img"
    runs = _sparse_source(src, target.size)
    run(["nbdcopy", str(src), target.uri])
    other = make_export(target.size)
    run(["nbdcopy", "--connections=4", "--requests=16", target.uri, other.uri])
    _check_sparse_map(other.uri, target.size, runs, hole=True)
    out = tmp_path / "out.img"
    run(["nbdcopy", other.uri, str(out)])
    cmp(src, out)


def test_destination_smaller_than_source_is_refused(target: Target, tmp_path: Path) -> None:
    src = tmp_path / "big.img"
    with src.open("wb") as f:
        f.truncate(target.size + 512)
    result = run(["nbdcopy", str(src), target.uri], check=False)
    assert result.returncode != 0
    assert b"smaller" in result.stderr
