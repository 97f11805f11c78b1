"""FileStore on real temporary files: data, holes, zeroing, extents, growth, error mapping."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrorpool.nbd.constants import AllocationFlag, Errno
from mirrorpool.store import Extent, FastZeroUnsupported, FileStore, StoreError
from mirrorpool.store import file as file_module

HOLE_ZERO = AllocationFlag.HOLE | AllocationFlag.ZERO
DATA = AllocationFlag(0)
MIB = 1 << 20
CHUNK = 64 * 1024  # well above any filesystem block size, so holes are exact


def read(store: FileStore, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    store.read_into(memoryview(buf), offset)
    return bytes(buf)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def pattern(length: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(length))


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "lu.img"


@pytest.fixture
def store(store_path: Path) -> Iterator[FileStore]:
    s = FileStore.create(str(store_path), 4 * MIB)
    yield s
    s.close()


def test_create_makes_a_sparse_file_of_the_size(store: FileStore, store_path: Path) -> None:
    assert store.size == 4 * MIB
    assert os.path.getsize(store_path) == 4 * MIB
    assert allocated(store_path) < CHUNK
    assert not store.is_block_device
    assert read(store, 0, 4096) == bytes(4096)


def test_create_refuses_an_existing_file(store: FileStore, store_path: Path) -> None:
    with pytest.raises(FileExistsError):
        FileStore.create(str(store_path), MIB)


def test_open_takes_the_size_from_the_file(store_path: Path) -> None:
    store_path.write_bytes(b"x" * 8192)
    s = FileStore(str(store_path))
    try:
        assert s.size == 8192
    finally:
        s.close()


def test_read_write_round_trip(store: FileStore, store_path: Path) -> None:
    data = pattern(3 * 4096 + 100)
    store.write(data, 5000)
    store.write(memoryview(b"\xab" * 512), 4 * MIB - 512, fua=True)
    assert read(store, 5000, len(data)) == data
    assert read(store, 4 * MIB - 512, 512) == b"\xab" * 512
    assert read(store, 0, 5000) == bytes(5000)
    store.flush()
    # what another opener of the file sees: the same bytes
    with open(store_path, "rb") as f:
        f.seek(5000)
        assert f.read(len(data)) == data


def test_overlapping_writes_last_one_wins(store: FileStore) -> None:
    store.write(b"A" * 8192, 0)
    store.write(b"B" * 100, 4000)
    got = read(store, 0, 8192)
    assert got == b"A" * 4000 + b"B" * 100 + b"A" * (8192 - 4100)


def test_write_past_end_of_a_short_file(tmp_path: Path) -> None:
    # a backing file shorter than the store: writing past its end extends it,
    # keeps what was there, and the gap reads as zeros
    path = tmp_path / "short.img"
    path.write_bytes(b"head" * 256)  # 1024 bytes
    s = FileStore(str(path), MIB)
    try:
        s.write(b"tail" * 128, 64 * 1024)
        assert os.path.getsize(path) == 64 * 1024 + 512
        assert read(s, 0, 1024) == b"head" * 256
        assert read(s, 1024, 64 * 1024 - 1024) == bytes(64 * 1024 - 1024)
        assert read(s, 64 * 1024, 512) == b"tail" * 128
        assert s.size == MIB  # the store's size is its own, not the file's
    finally:
        s.close()


def test_read_of_backing_shorter_than_store_reads_zeros(tmp_path: Path) -> None:
    path = tmp_path / "short.img"
    path.write_bytes(b"\x11" * 1000)
    s = FileStore(str(path), 8192)
    try:
        got = read(s, 0, 8192)
        assert got == b"\x11" * 1000 + bytes(7192)
        assert read(s, 4096, 4096) == bytes(4096)  # entirely past the end of file
        dirty = bytearray(b"\xff" * 512)
        s.read_into(memoryview(dirty), 7680)
        assert dirty == bytes(512)  # the buffer is overwritten, not left as it was
    finally:
        s.close()


def test_zero_may_trim_punches_a_hole(store: FileStore, store_path: Path) -> None:
    store.write(pattern(4 * CHUNK), 0)
    store.flush()
    before = allocated(store_path)
    assert before >= 4 * CHUNK
    store.zero(CHUNK, 2 * CHUNK, may_trim=True)
    assert read(store, CHUNK, 2 * CHUNK) == bytes(2 * CHUNK)
    assert read(store, 0, CHUNK) == pattern(4 * CHUNK)[:CHUNK]
    assert read(store, 3 * CHUNK, CHUNK) == pattern(4 * CHUNK)[3 * CHUNK:]
    assert store.extents(CHUNK, 2 * CHUNK) == [Extent(CHUNK, 2 * CHUNK, HOLE_ZERO)]
    assert allocated(store_path) <= before - 2 * CHUNK
    assert os.path.getsize(store_path) == 4 * MIB  # size kept


def test_zero_without_trim_reads_zeros_and_keeps_allocation(store: FileStore) -> None:
    store.write(pattern(2 * CHUNK), 0)
    store.zero(100, CHUNK, may_trim=False, fua=True)
    got = read(store, 0, 2 * CHUNK)
    assert got[:100] == pattern(100)
    assert got[100:100 + CHUNK] == bytes(CHUNK)
    assert got[100 + CHUNK:] == pattern(2 * CHUNK)[100 + CHUNK:]
    # NO_HOLE: the range stays allocated, never reported as a hole
    assert all(not e.flags & AllocationFlag.HOLE for e in store.extents(0, 2 * CHUNK))


def test_zero_without_trim_falls_back_to_writing_zeros(store: FileStore) -> None:
    store.write(pattern(CHUNK), 0)
    store._zero_range_ok = False  # as on a filesystem without FALLOC_FL_ZERO_RANGE
    store.zero(0, CHUNK, may_trim=False)
    assert read(store, 0, CHUNK) == bytes(CHUNK)
    with pytest.raises(FastZeroUnsupported) as info:
        store.zero(0, CHUNK, may_trim=False, fast=True)
    assert info.value.code == Errno.ENOTSUP


def test_trim_reads_zeros_and_frees_space(store: FileStore, store_path: Path) -> None:
    store.write(pattern(4 * CHUNK), 0)
    store.flush()
    before = allocated(store_path)
    store.trim(0, 4 * CHUNK, fua=True)
    assert read(store, 0, 4 * CHUNK) == bytes(4 * CHUNK)
    assert allocated(store_path) <= before - 4 * CHUNK
    assert store.extents(0, 4 * CHUNK) == [Extent(0, 4 * CHUNK, HOLE_ZERO)]


def test_extents_of_a_mixed_file(store: FileStore) -> None:
    # data | hole | data | hole to the end
    store.write(pattern(CHUNK), 0)
    store.write(pattern(CHUNK, 2), 3 * CHUNK)
    assert store.extents(0, 4 * MIB) == [
        Extent(0, CHUNK, DATA),
        Extent(CHUNK, 2 * CHUNK, HOLE_ZERO),
        Extent(3 * CHUNK, CHUNK, DATA),
        Extent(4 * CHUNK, 4 * MIB - 4 * CHUNK, HOLE_ZERO),
    ]


def test_extents_start_inside_a_run_and_stop_at_the_range(store: FileStore) -> None:
    store.write(pattern(2 * CHUNK), 2 * CHUNK)
    assert store.extents(CHUNK, 2 * CHUNK) == [
        Extent(CHUNK, CHUNK, HOLE_ZERO),
        Extent(2 * CHUNK, CHUNK, DATA),
    ]
    # a range asked past the store's size is cut at the size
    assert store.extents(4 * MIB - CHUNK, 10 * MIB) == [Extent(4 * MIB - CHUNK, CHUNK, HOLE_ZERO)]


def test_extents_cover_the_range_contiguously(store: FileStore) -> None:
    for i in range(0, 64, 3):
        store.write(b"\x01" * 4096, i * CHUNK // 4)
    runs = store.extents(1000, 3 * MIB)
    assert runs[0].offset == 1000
    for a, b in zip(runs, runs[1:], strict=False):
        assert a.end == b.offset
        assert a.flags != b.flags  # neighbours with the same state are merged
    assert runs[-1].end == 1000 + 3 * MIB


def test_extents_of_data_past_the_end_of_a_short_backing_file(tmp_path: Path) -> None:
    path = tmp_path / "short.img"
    path.write_bytes(pattern(CHUNK))
    s = FileStore(str(path), 4 * CHUNK)
    try:
        assert s.extents(0, 4 * CHUNK) == [
            Extent(0, CHUNK, DATA),
            Extent(CHUNK, 3 * CHUNK, HOLE_ZERO),
        ]
    finally:
        s.close()


def test_resize_grow_keeps_data_and_reads_zeros_after(store: FileStore, store_path: Path) -> None:
    store.write(b"\x42" * 4096, 4 * MIB - 4096)
    store.resize(8 * MIB)
    assert store.size == 8 * MIB
    assert os.path.getsize(store_path) == 8 * MIB
    assert read(store, 4 * MIB - 4096, 4096) == b"\x42" * 4096
    assert read(store, 4 * MIB, 4 * MIB) == bytes(4 * MIB)
    store.write(b"\x43" * 512, 8 * MIB - 512)
    assert read(store, 8 * MIB - 512, 512) == b"\x43" * 512


def test_resize_never_truncates_a_longer_file(tmp_path: Path) -> None:
    path = tmp_path / "long.img"
    path.write_bytes(pattern(3 * CHUNK))
    s = FileStore(str(path), CHUNK)
    try:
        s.resize(2 * CHUNK)
        assert s.size == 2 * CHUNK
        assert path.read_bytes() == pattern(3 * CHUNK)
    finally:
        s.close()


def test_cache_is_harmless(store: FileStore) -> None:
    store.write(b"c" * 4096, 0)
    store.cache(0, MIB)
    assert read(store, 0, 4096) == b"c" * 4096


def test_close_twice_is_fine_and_io_after_close_is_a_store_error(store: FileStore) -> None:
    store.close()
    store.close()
    with pytest.raises(StoreError) as info:
        read(store, 0, 512)
    assert info.value.code == Errno.EIO
    with pytest.raises(StoreError):
        store.write(b"x" * 512, 0)
    with pytest.raises(StoreError):
        store.zero(0, 512)
    with pytest.raises(StoreError):
        store.extents(0, 512)


def test_flush_after_close_is_a_store_error(store: FileStore) -> None:
    store.close()
    with pytest.raises(StoreError):
        store.flush()


def test_write_on_a_full_filesystem_is_enospc(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    s = FileStore("/dev/full", 4096)
    try:
        with pytest.raises(StoreError) as info:
            s.write(b"x" * 4096, 0)
        assert info.value.code == Errno.ENOSPC
        assert "write at 0" in str(info.value)
    finally:
        s.close()


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errno.ENOSPC, Errno.ENOSPC),
        (errno.EDQUOT, Errno.ENOSPC),
        (errno.EFBIG, Errno.ENOSPC),
        (errno.EIO, Errno.EIO),
        (errno.EPERM, Errno.EPERM),
        (errno.EACCES, Errno.EPERM),
        (errno.EROFS, Errno.EPERM),
        (errno.EINVAL, Errno.EINVAL),
        (errno.EBADF, Errno.EIO),
        (errno.ENXIO, Errno.EIO),
    ],
)
def test_store_error_from_os_error(err: int, code: Errno) -> None:
    exc = StoreError.from_os_error(OSError(err, os.strerror(err)), "write at 4096")
    assert exc.code == code
    assert str(exc) == f"write at 4096: {os.strerror(err)}"


def test_store_error_from_os_error_without_errno() -> None:
    exc = StoreError.from_os_error(OSError("odd"), "read at 0")
    assert exc.code == Errno.EIO
    assert "read at 0" in str(exc) and "odd" in str(exc)


def resident_bytes(path: Path) -> int:
    """Bytes of the file in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def on_tmpfs(path: Path) -> bool:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip() == "tmpfs"


def test_release_writes_back_and_drops_the_cache(store: FileStore, store_path: Path) -> None:
    if on_tmpfs(store_path):
        pytest.skip("tmpfs pages live only in memory: there is no cache to drop")
    data = pattern(4 * MIB)
    store.write(data, 0)
    assert resident_bytes(store_path) > 0
    store.release()
    assert resident_bytes(store_path) == 0
    assert read(store, 0, 4 * MIB) == data


def test_big_writes_reach_the_kernel_in_pieces(store: FileStore, monkeypatch) -> None:
    """No write call bigger than WRITE_PIECE: the page cache then keeps small folios."""
    sizes: list[int] = []
    real = os.pwritev

    def counting(fd: int, buffers: list, offset: int) -> int:
        sizes.append(sum(len(b) for b in buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(file_module.os, "pwritev", counting)
    data = pattern(3 * file_module.WRITE_PIECE + 4096)
    store.write(data, 8192)
    assert max(sizes) <= file_module.WRITE_PIECE
    assert sum(sizes) == len(data)
    assert read(store, 8192, len(data)) == data
    sizes.clear()
    store.write(pattern(4096, seed=2), 0)
    assert sizes == [4096]
