"""Child process for tests/crash/test_known_bugs.py: member rows saved out of order.

    python -m tests.crash.stale_rows_child DATA_DIR

LU ``lu`` (1 MiB, pool 3).  The resync of the active backup (member 1) finishes and
saves the pool's member rows (save_volume): it takes them under the sequencer lock,
then waits for the catalog (held here until trigger t2 is answered, as the catalog
lock is held by another trigger's transaction on a busy device).  Trigger t2 splits
member 1 off as generation 2, commits and is answered; only then does the resync's
save commit the rows it took before the split.  The device is then killed.

Prints the answer of t2 as JSON on its first line of output.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from mirrorpool.device.device import Device
from mirrorpool.mirror.changes import CHUNK

OFFSET = 3 * CHUNK


def main(data_dir: str) -> None:
    device = Device(data_dir)
    volume = device.create_lu("lu", 1 << 20, pool=3).volume
    op = volume.begin(OFFSET, 4096)
    volume.write(op, b"A" * 4096, OFFSET)
    volume.pause_resync(True)
    device.triggers.trigger(["lu"], "t1")  # gen 1 = member 0; member 1 active, syncing

    entered, release, committed = threading.Event(), threading.Event(), threading.Event()
    save_pool = device.catalog.save_pool

    def slow_for_resync(*args: object, **kwargs: object) -> None:
        if not threading.current_thread().name.startswith("resync-"):
            save_pool(*args, **kwargs)  # type: ignore[arg-type]
            return
        entered.set()  # the rows are taken; now the catalog is busy for a while
        release.wait(10)
        save_pool(*args, **kwargs)  # type: ignore[arg-type]
        committed.set()

    device.catalog.save_pool = slow_for_resync  # type: ignore[method-assign]
    volume.pause_resync(False)  # member 1 gets in sync and saves the pool
    if not entered.wait(10):
        raise TimeoutError("the resync did not save the pool")
    answer = device.triggers.trigger(["lu"], "t2")[0]  # gen 2 = member 1, answered
    print(json.dumps(answer), flush=True)
    volume.pause_resync(True)  # no later save repairs the rows before the crash
    release.set()
    if not committed.wait(10):
        raise TimeoutError("the resync's save did not commit")
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1])
