"""How resync copies chunks from the primary into a recycled pool member."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mirrorpool.device.device import Device
from mirrorpool.errors import InvalidRequest
from mirrorpool.mirror.changes import CHUNK
from mirrorpool.mirror.volume import MirroredVolume
from mirrorpool.store import FileStore, StoreError
from mirrorpool.store import file as file_module
from mirrorpool.store.file import copy_chunks

SIZE = 8 << 20


def wait_in_sync(volume: MirroredVolume, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while volume.active is None or volume.active.pending:
        assert time.monotonic() < deadline, "the active backup did not come in sync"
        time.sleep(0.01)


def store_bytes(store: FileStore) -> bytes:
    buf = bytearray(SIZE)
    store.read_into(memoryview(buf), 0)
    return bytes(buf)


@pytest.fixture(params=["native", "python"])
def copy_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the C chunk copy, and again with the Python one it falls back to."""
    if request.param == "python":
        monkeypatch.setattr(file_module, "_chunkcopy", None)
    return str(request.param)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler: copies run in Python")
def test_the_c_chunk_copy_is_built() -> None:
    """``pip install`` builds it where a C compiler is present, as scripts/install.sh ensures."""
    assert file_module._chunkcopy is not None


def test_scattered_chunks_are_read_and_written_not_spliced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy_path: str
) -> None:
    """copy_file_range costs 3 to 15 times a read and a write for one chunk on ext4."""

    spliced: list[tuple] = []
    real = os.copy_file_range

    def counted(*args: int) -> int:
        spliced.append(args)
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", counted)
    device = Device(str(tmp_path / "data"))
    try:
        volume = device.create_lu("lu", SIZE, pool=2).volume
        wait_in_sync(volume)
        first = volume.active
        assert first is not None
        device.triggers.trigger(["lu"], "a")  # the other member becomes active
        wait_in_sync(volume)
        for i, chunk in enumerate(range(3, SIZE // CHUNK, 97)):
            op = volume.begin(chunk * CHUNK, CHUNK)
            volume.write(op, bytes([i % 251 + 1]) * CHUNK, chunk * CHUNK)
        volume.pause_resync(True)
        device.triggers.trigger(["lu"], "b")  # ``first`` is recycled: it lacks those writes
        assert volume.active is first
        assert len(first.pending) == len(range(3, SIZE // CHUNK, 97))
        volume.pause_resync(False)
        wait_in_sync(volume)
        assert store_bytes(first.store) == store_bytes(volume.primary)
        assert spliced == []
    finally:
        device.close()


def test_copy_buffers_are_per_thread() -> None:
    """Resync and copy-before-write copy at once, from different threads."""
    mine = file_module._copy_buffer()
    assert file_module._copy_buffer() is mine
    theirs: list[memoryview] = []
    t = threading.Thread(target=lambda: theirs.append(file_module._copy_buffer()))
    t.start()
    t.join()
    assert theirs[0] is not mine
    assert len(mine) == file_module.COPY_BUFFER


def make_store(path: Path, data: bytes) -> FileStore:
    path.write_bytes(data)
    return FileStore(str(path), len(data))


def test_copy_chunks_copies_those_chunks_only(tmp_path: Path, copy_path: str) -> None:
    size = 64 * CHUNK + 1000  # a last chunk that is partly past the end
    rng = np.random.default_rng(7)
    src = make_store(tmp_path / "src", rng.bytes(size))
    dst = make_store(tmp_path / "dst", b"\xee" * size)
    # single chunks, runs, a run longer than the copy buffer, and the partial last chunk
    wanted = [0, 2, 3, 4, 9, *range(10, 10 + 70), 90, 64]
    wanted = sorted({c for c in wanted if c * CHUNK < size})
    copied = copy_chunks(src, dst, np.array(wanted, dtype=np.uint32), CHUNK, size)
    assert copied == sum(min(CHUNK, size - c * CHUNK) for c in wanted)
    before, after = (tmp_path / "src").read_bytes(), (tmp_path / "dst").read_bytes()
    assert len(after) == size  # nothing written past the limit
    for c in range(size // CHUNK + 1):
        part = slice(c * CHUNK, min((c + 1) * CHUNK, size))
        expected = before[part] if c in wanted else b"\xee" * (part.stop - part.start)
        assert after[part] == expected, f"chunk {c}"


def test_copy_chunks_reads_zeros_past_a_short_source(tmp_path: Path, copy_path: str) -> None:
    src = make_store(tmp_path / "src", b"\x01" * (2 * CHUNK + 10))
    src._size = 8 * CHUNK  # a backing file shorter than its LU
    dst = make_store(tmp_path / "dst", b"\xee" * (8 * CHUNK))
    copy_chunks(src, dst, np.array([2, 3, 6], dtype=np.uint32), CHUNK, 8 * CHUNK)
    after = (tmp_path / "dst").read_bytes()
    assert after[2 * CHUNK : 2 * CHUNK + 10] == b"\x01" * 10
    assert after[2 * CHUNK + 10 : 4 * CHUNK] == bytes(2 * CHUNK - 10)
    assert after[6 * CHUNK : 7 * CHUNK] == bytes(CHUNK)
    assert after[4 * CHUNK : 6 * CHUNK] == b"\xee" * (2 * CHUNK)


def test_copy_chunks_failures_name_the_side(tmp_path: Path, copy_path: str) -> None:
    src = make_store(tmp_path / "src", b"\x01" * (4 * CHUNK))
    dst = make_store(tmp_path / "dst", b"\x02" * (4 * CHUNK))
    readonly = FileStore.__new__(FileStore)
    readonly.__dict__.update(dst.__dict__)
    readonly._fd = os.open(tmp_path / "dst", os.O_RDONLY)
    with pytest.raises(StoreError, match=f"write.* at {2 * CHUNK}"):
        copy_chunks(src, readonly, np.array([2], dtype=np.uint32), CHUNK, 4 * CHUNK)
    unreadable = FileStore.__new__(FileStore)
    unreadable.__dict__.update(src.__dict__)
    unreadable._fd = os.open(tmp_path / "src", os.O_WRONLY)
    with pytest.raises(StoreError, match=f"read.* at {CHUNK}"):
        copy_chunks(unreadable, dst, np.array([1], dtype=np.uint32), CHUNK, 4 * CHUNK)
    assert (tmp_path / "dst").read_bytes() == b"\x02" * (4 * CHUNK)


def make_stale(device: Device, volume: MirroredVolume) -> None:
    """The next active backup of this pool-2 LU must copy 1024 single chunks (4 steps)."""
    device.triggers.trigger(["lu"], "a")
    wait_in_sync(volume)
    for chunk in range(0, SIZE // CHUNK, 2):
        op = volume.begin(chunk * CHUNK, CHUNK)
        volume.write(op, bytes([chunk % 251 + 1]) * CHUNK, chunk * CHUNK)
    volume.pause_resync(True)
    device.triggers.trigger(["lu"], "b")


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_a_resync_yields_only_while_hosts_write(tmp_path: Path, share: float) -> None:
    device = Device(str(tmp_path / "data"), resync_share=share)
    try:
        volume = device.create_lu("lu", SIZE, pool=2).volume
        wait_in_sync(volume)
        yields: list[float] = []
        volume._yield_to_hosts = yields.append  # type: ignore[method-assign]
        make_stale(device, volume)
        volume.pause_resync(False)
        wait_in_sync(volume)  # nothing writes: full speed
        assert yields == []

        make_stale(device, volume)  # the other member, stale the same way
        copy_data = volume._copy_data

        def host_writes_meanwhile(member, chunks):  # type: ignore[no-untyped-def]
            op = volume.begin(CHUNK, CHUNK)  # chunk 1: not one the resync copies
            volume.write(op, b"\x07" * CHUNK, CHUNK)
            copy_data(member, chunks)

        volume._copy_data = host_writes_meanwhile  # type: ignore[method-assign]
        volume.pause_resync(False)
        wait_in_sync(volume)
        if share < 1.0:
            assert yields and all(y > 0 for y in yields)
        else:
            assert yields == []
        wait_in_sync(volume)
        assert store_bytes(volume.active.store) == store_bytes(volume.primary)  # type: ignore[union-attr]
    finally:
        device.close()


def test_the_resync_share_is_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="resync share"):
        Device(str(tmp_path / "data"), resync_share=0)


@pytest.mark.skipif(file_module._chunkcopy is None, reason="the C chunk copy is not built")
def test_the_c_copy_takes_only_ascending_uint32_chunk_numbers(tmp_path: Path) -> None:
    src = make_store(tmp_path / "src", b"\x01" * (4 * CHUNK))
    dst = make_store(tmp_path / "dst", b"\x02" * (4 * CHUNK))
    copy = file_module._chunkcopy.copy_chunks
    for wrong in (np.array([1], dtype=np.int32), np.array([1.0], dtype=np.float32),
                  np.array([1], dtype=np.uint64)):
        with pytest.raises(ValueError):
            copy(src.fd, dst.fd, wrong, CHUNK, 4 * CHUNK)
    with pytest.raises(ValueError):
        copy(src.fd, dst.fd, np.array([1], dtype=np.uint32), 0, 4 * CHUNK)
    assert (tmp_path / "dst").read_bytes() == b"\x02" * (4 * CHUNK)


def test_stop_ends_a_pause_at_once(tmp_path: Path) -> None:
    device = Device(str(tmp_path / "data"))
    try:
        volume = device.create_lu("lu", SIZE, pool=2).volume
        wait_in_sync(volume)
        waiter = threading.Thread(target=volume._yield_to_hosts, args=(30.0,))
        started = time.monotonic()
        waiter.start()
        time.sleep(0.05)
        volume.stop()
        waiter.join(5)
        assert not waiter.is_alive()
        assert time.monotonic() - started < 5
    finally:
        device.close()


def test_power_loss_mode_flushes_a_copy_before_clearing_its_bits(tmp_path: Path) -> None:
    """With --journal-sync a pending file may never say copied what is not on disk."""
    device = Device(str(tmp_path / "data"), journal_sync=True)
    try:
        volume = device.create_lu("lu", SIZE, pool=2).volume
        wait_in_sync(volume)
        events: list[str] = []
        for member in volume.members:
            store, bits = member.store, member.pending_file
            assert bits is not None
            real_flush, real_clear = store.flush, bits.clear
            store.flush = lambda f=real_flush: (events.append("flush"), f())[1]  # type: ignore
            bits.clear = lambda c, f=real_clear: (events.append("clear"), f(c))[1]  # type: ignore
        make_stale(device, volume)
        events.clear()
        volume.pause_resync(False)
        wait_in_sync(volume)
        assert "clear" in events
        for i, event in enumerate(events):
            if event == "clear":
                assert i > 0 and events[i - 1] == "flush", events
    finally:
        device.close()



def test_the_next_copy_does_not_wait_for_a_cache_drop(tmp_path: Path) -> None:
    """Dropping a bulk-copied member's cache writes gigabytes back: a trigger must not wait."""
    device = Device(str(tmp_path / "data"))
    released = threading.Event()
    try:
        volume = device.create_lu("lu", SIZE, pool=2).volume
        wait_in_sync(volume)
        op = volume.begin(0, SIZE)
        volume.write(op, bytes(range(256)) * (SIZE // 256), 0)
        dropping = threading.Event()

        def held_release() -> None:
            dropping.set()
            released.wait(30)

        for member in volume.members:
            member.store.release = held_release  # type: ignore[method-assign]
        device.triggers.trigger(["lu"], "a")  # the other member copies the whole LU
        wait_in_sync(volume)
        assert dropping.wait(5), "a bulk copy should drop the member's cache"
        for chunk in range(0, SIZE // CHUNK, 3):
            op = volume.begin(chunk * CHUNK, CHUNK)
            volume.write(op, b"\x09" * CHUNK, chunk * CHUNK)
        device.triggers.trigger(["lu"], "b")
        wait_in_sync(volume, timeout=5)  # while the drop is still held
        assert not released.is_set()
        assert store_bytes(volume.active.store) == store_bytes(volume.primary)  # type: ignore[union-attr]
    finally:
        released.set()
        device.close()


def test_a_failed_write_back_fails_the_member(tmp_path: Path) -> None:
    """The member's pending bits are cleared: data lost in the write-back must not pass."""
    device = Device(str(tmp_path / "data"))
    try:
        volume = device.create_lu("lu", SIZE, pool=2).volume
        wait_in_sync(volume)
        op = volume.begin(0, SIZE)
        volume.write(op, bytes(range(256)) * (SIZE // 256), 0)

        def failing_release() -> None:
            raise StoreError(5, "write-back: injected error")

        for member in volume.members:
            member.store.release = failing_release  # type: ignore[method-assign]
        copying = next(m for m in volume.members if m is not volume.active)
        device.triggers.trigger(["lu"], "a")  # ``copying`` copies the whole LU, then drops
        deadline = time.monotonic() + 10
        while copying.state.value != "failed":
            assert time.monotonic() < deadline, "the member should fail"
            time.sleep(0.01)
    finally:
        device.close()
