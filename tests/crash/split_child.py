"""Child process for tests/crash/test_known_bugs.py: a device that dies inside a split.

    python -m tests.crash.split_child DATA_DIR MODE

makes LU ``lu`` (1 MiB, pool 3), writes "A" then triggers (generation 1), writes "B"
then triggers (generation 2), then sends a third trigger and SIGKILLs itself once
the split was applied and reached the head of the queue (finish_split), before the
trigger's catalog transaction (save_split) made it durable:

* ``pending``: nothing else happens first;
* ``write``: a write of "C" lands first (on the member that held generation 1);
* ``resync``: 0.3 s pass first, in which the new active backup's resync finishes and
  saves the pool's member rows;
* ``group``: the third trigger splits ``lu`` and a second LU, ``lu2``, at one cut (a
  consistency group), and the device dies once both splits reached that point.

Every write is 4 KiB at OFFSET (chunk 3).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from mirrorpool.device.device import Device
from mirrorpool.mirror.changes import CHUNK

OFFSET = 3 * CHUNK


class Scene:
    """LU ``lu`` of pool 3: "A" then trigger t1, "B" then trigger t2, each resynced."""

    def __init__(self, data_dir: str, size: int) -> None:
        self.device = Device(data_dir)
        self.volume = self.device.create_lu("lu", size, pool=3).volume
        self.write(b"A")
        self.device.triggers.trigger(["lu"], "t1")
        self.in_sync()
        self.write(b"B")
        self.device.triggers.trigger(["lu"], "t2")
        self.in_sync()

    def write(self, byte: bytes) -> None:
        op = self.volume.begin(OFFSET, 4096)
        self.volume.write(op, byte * 4096, OFFSET)

    def in_sync(self) -> None:
        volume = self.volume
        deadline = time.monotonic() + 10
        while volume.active is not None and volume.active.pending:
            if time.monotonic() > deadline:
                raise TimeoutError("resync did not finish")
            time.sleep(0.01)


def main(data_dir: str, mode: str) -> None:
    scene = Scene(data_dir, 1 << 20)
    device, volume, write = scene.device, scene.volume, scene.write

    finish_split = volume.finish_split

    def finish_then_die(plan: object) -> None:
        finish_split(plan)  # type: ignore[arg-type]
        # the trigger would now make the split durable in the catalog, and answer
        if mode == "write":
            write(b"C")
        elif mode == "resync":
            time.sleep(0.3)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "group":
        second = device.create_lu("lu2", 1 << 20, pool=3).volume
        last_finish = second.finish_split

        def finish_both_then_die(plan: object) -> None:
            last_finish(plan)  # type: ignore[arg-type]
            os.kill(os.getpid(), signal.SIGKILL)

        second.finish_split = finish_both_then_die  # type: ignore[method-assign]
        device.triggers.trigger(["lu", "lu2"], "t3")
        return
    volume.finish_split = finish_then_die  # type: ignore[method-assign]
    device.triggers.trigger(["lu"], "t3")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
