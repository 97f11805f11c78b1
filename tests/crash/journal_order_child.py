"""Child process for tests/crash/test_known_bugs.py: killed inside apply_split.

    python -m tests.crash.journal_order_child DATA_DIR [before|after]

LU ``lu`` (32 MiB, pool 3): "A" then trigger t1 (generation 1 on member 0), "B" then
t2 (generation 2 on member 1), both resynced; zeros over the LU's last 31 MiB, so
that chunk 3 has left the journal's write-intent slots; then trigger t3, which
recycles member 0.  The device is SIGKILLed inside apply_split, either when it is about to
note the split in the crash journal (``before``: record_split) or just after,
before the pending files of the members involved are rewritten (``after``: the
journal's rotate).  Every write is 4 KiB at OFFSET.
"""

from __future__ import annotations

import os
import signal
import sys

from tests.crash.split_child import Scene


def main(data_dir: str, moment: str) -> None:
    scene = Scene(data_dir, 32 << 20)
    device, volume = scene.device, scene.volume
    op = volume.begin(1 << 20, 31 << 20)
    volume.zero(op, 1 << 20, 31 << 20, may_trim=False)
    scene.in_sync()
    assert volume.journal is not None

    def die(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if moment == "before":
        volume.journal.record_split = die  # type: ignore[method-assign]
    else:
        volume.journal.rotate = die  # type: ignore[method-assign]
    device.triggers.trigger(["lu"], "t3")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "before")
