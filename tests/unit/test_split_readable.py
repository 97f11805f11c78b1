"""A generation is readable as soon as its split is taken, exact from the first read.

Mutations admitted before the TRIGGER may still be running.  A read of the
generation waits for those it overlaps, and for nothing else.
"""

from __future__ import annotations

import threading
from pathlib import Path

from mirrorpool.device.device import Device
from mirrorpool.mirror.changes import CHUNK

OFFSET = 5 * CHUNK


def test_reads_wait_only_for_the_earlier_writes_they_overlap(tmp_path: Path) -> None:
    device = Device(str(tmp_path / "data"))
    try:
        volume = device.create_lu("lu", 1 << 20, pool=2).volume
        device.triggers.trigger(["lu"], "first")  # member in sync, nothing in flight
        op = volume.begin(OFFSET, CHUNK)  # admitted before the trigger, not yet applied
        pending = device.triggers.begin(["lu"], "t", "api")
        plan = pending.plans[0]
        view = volume.generation_view(plan.gen)
        assert not plan.gen_member.split_done.is_set()

        elsewhere = bytearray(CHUNK)
        view.read_into(memoryview(elsewhere), 0)  # returns at once: no overlap
        assert elsewhere == bytes(CHUNK)

        got = bytearray(CHUNK)
        reader = threading.Thread(target=view.read_into, args=(memoryview(got), OFFSET))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive(), "read of the generation did not wait for the earlier write"
        volume.write(op, b"W" * CHUNK, OFFSET)
        reader.join(10)
        assert not reader.is_alive()
        assert got == b"W" * CHUNK  # the write was ordered before the trigger

        answer = device.triggers.complete(pending)[0]
        assert answer["gen"] == plan.gen
        assert plan.gen_member.split_done.is_set()
        assert volume.settle_latencies[-1] >= volume.split_latencies[-1]
    finally:
        device.close()
