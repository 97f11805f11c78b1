"""How resync copies chunks from the primary into a recycled pool member."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from mirrorpool.device.device import Device
from mirrorpool.mirror import volume as volume_module
from mirrorpool.mirror.changes import CHUNK
from mirrorpool.mirror.volume import MirroredVolume
from mirrorpool.store import FileStore

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


def test_scattered_chunks_are_read_and_written_not_spliced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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
    mine = volume_module._copy_buffer()
    assert volume_module._copy_buffer() is mine
    theirs: list[memoryview] = []
    t = threading.Thread(target=lambda: theirs.append(volume_module._copy_buffer()))
    t.start()
    t.join()
    assert theirs[0] is not mine
    assert len(mine) == volume_module.SPARSE_COPY
