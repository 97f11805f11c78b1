"""Child process for tests/crash/test_known_bugs.py: killed inside apply_split.

    python -m tests.crash.journal_order_child DATA_DIR

LU ``lu`` (1 MiB, pool 3): "A" then trigger t1 (generation 1 on member 0), "B" then
t2 (generation 2 on member 1), both resynced; then trigger t3, which recycles
member 0.  The device is SIGKILLed when apply_split is about to note the split in
the crash journal (record_split), that is after it rewrote the pending files of
the members involved.  Every write is 4 KiB at OFFSET.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from mirrorpool.device.device import Device
from mirrorpool.mirror.changes import CHUNK

OFFSET = 3 * CHUNK


def main(data_dir: str) -> None:
    device = Device(data_dir)
    volume = device.create_lu("lu", 1 << 20, pool=3).volume

    def write(byte: bytes) -> None:
        op = volume.begin(OFFSET, 4096)
        volume.write(op, byte * 4096, OFFSET)

    def in_sync() -> None:
        deadline = time.monotonic() + 10
        while volume.active is not None and volume.active.pending:
            if time.monotonic() > deadline:
                raise TimeoutError("resync did not finish")
            time.sleep(0.01)

    write(b"A")
    device.triggers.trigger(["lu"], "t1")
    in_sync()
    write(b"B")
    device.triggers.trigger(["lu"], "t2")
    in_sync()
    assert volume.journal is not None

    def die(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    volume.journal.record_split = die  # type: ignore[method-assign]
    device.triggers.trigger(["lu"], "t3")


if __name__ == "__main__":
    main(sys.argv[1])
