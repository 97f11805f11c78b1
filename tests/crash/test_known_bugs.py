"""Deterministic reproductions of the product bugs the crash harness found.

Each test drives the device's own objects in-process (a split placed at an exact
moment by wrapping one call, or a child process killed inside a split).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mirrorpool.device.device import Device
from mirrorpool.mirror.changes import CHUNK
from tests.crash.split_child import OFFSET

REPO = Path(__file__).resolve().parents[2]


def _read(view, offset: int) -> bytes:  # type: ignore[no-untyped-def]
    buf = bytearray(4096)
    view.read_into(memoryview(buf), offset)
    return bytes(buf[:1])


def test_split_during_copy_before_write_keeps_the_chunk_pending(tmp_path: Path) -> None:
    """Invariants 1 and 2 without any crash.

    gen 2 (member 1) still lacks chunk c (copy-before-write pending).  Write W (Y) on c
    copies c into member 1; while that copy is in flight, trigger T3 splits: member 1
    is recycled as the active backup and c, changed by W, is marked pending for it.
    The copy then clears c.  W (seq below T3) goes to the primary and to the old
    active only, so member 1 never gets Y, yet reports in-sync.
    """
    device = Device(str(tmp_path / "data"))
    try:
        lu = device.create_lu("lu", 1 << 20, pool=2)
        volume = lu.volume
        offset = 3 * CHUNK

        def write(byte: bytes) -> None:
            op = volume.begin(offset, 4096)
            volume.write(op, byte * 4096, offset)

        volume.pause_resync(True)  # keep chunk 3 pending on member 1
        write(b"X")
        device.triggers.trigger(["lu"], "t1")  # gen 1 = member 0; member 1 active, 3 pending
        device.triggers.trigger(["lu"], "t2")  # gen 2 = member 1 (3 pending); member 0 active
        member1 = next(m for m in volume.members if m.idx == 1)
        assert list(member1.pending) == [3]

        original = volume._copy_data
        applied = threading.Event()
        answers: list[dict] = []

        def split_now() -> None:
            pending = device.triggers.begin(["lu"], "t3", "api")
            applied.set()
            answers.extend(device.triggers.complete(pending))

        def copy_then_split(member, chunks):  # type: ignore[no-untyped-def]
            original(member, chunks)
            if member is member1 and not applied.is_set():
                threading.Thread(target=split_now, daemon=True).start()
                assert applied.wait(10)

        volume._copy_data = copy_then_split  # type: ignore[method-assign]
        write(b"Y")  # copy-before-write of chunk 3 into gen 2, T3 in the middle
        volume._copy_data = original  # type: ignore[method-assign]
        for _ in range(100):
            if answers:
                break
            threading.Event().wait(0.05)
        assert volume.active is member1
        volume.pause_resync(False)
        made = device.triggers.trigger(["lu"], "t4")[0]  # nothing in flight
        gen4 = volume.generation_view(made["gen"])
        primary = bytearray(4096)
        volume.primary.read_into(memoryview(primary), offset)
        assert primary[:1] == b"Y"
        assert _read(gen4, offset) == b"Y", (
            f"generation {made['gen']} (member {made['member']}, the in-sync active backup "
            "before t4) lacks write Y acknowledged before t4")
    finally:
        device.close()


def _crash_inside_split(tmp_path: Path, mode: str) -> Device:
    data = tmp_path / "data"
    child = subprocess.run([sys.executable, "-m", "tests.crash.split_child", str(data), mode],
                           cwd=REPO, capture_output=True, timeout=120)
    assert child.returncode == -9, child.stderr.decode()[-3000:]
    return Device(str(data))


@pytest.mark.parametrize("mode", ["pending", "write"])
def test_crash_inside_a_split_leaves_older_generations_alone(tmp_path: Path,
                                                             mode: str) -> None:
    """Invariant 5: generations are never altered by recovery.

    Generation 1 holds "A".  The unanswered trigger t3 may take effect or not, but
    if generation 1 is still listed after the restart it must still read "A".
    """
    device = _crash_inside_split(tmp_path, mode)
    try:
        volume = device.get_lu("lu").volume
        live = {m.gen: m for m in volume.live_generations()}
        if 1 in live:
            assert _read(volume.generation_view(1), OFFSET) == b"A", (
                f"generation 1 (member {live[1].idx}) changed by the crash")
        assert _read(volume.generation_view(2), OFFSET) == b"B"
    finally:
        device.close()


def test_crash_inside_a_split_leaves_no_generation_without_record(tmp_path: Path) -> None:
    device = _crash_inside_split(tmp_path, "resync")
    try:
        listed = device.backups.generations("lu")
        assert all("seq" in g for g in listed), f"generation without a record: {listed}"
        made = device.triggers.trigger(["lu"], "after-restart")[0]
        gens = [g["gen"] for g in device.backups.generations("lu")]
        assert len(gens) == len(set(gens)), (
            f"trigger answered gen {made['gen']}, now listed twice: {gens}")
    finally:
        device.close()


def test_acknowledged_generation_survives_member_rows_saved_out_of_order(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    child = subprocess.run([sys.executable, "-m", "tests.crash.stale_rows_child", str(data)],
                           cwd=REPO, capture_output=True, timeout=120)
    assert child.returncode == -9, child.stderr.decode()[-3000:]
    answer = json.loads(child.stdout.decode().splitlines()[0])
    device = Device(str(data))
    try:
        listed = {g["gen"]: g for g in device.backups.generations("lu")}
        members = [(m.idx, m.state.value, m.gen) for m in device.get_lu("lu").volume.members]
        assert answer["gen"] in listed, (
            f"trigger t2 was answered with generation {answer['gen']} on member "
            f"{answer['member']}; after the crash: generations {sorted(listed)}, "
            f"members {members}")
    finally:
        device.close()


def _crash_in_apply_split(tmp_path: Path, moment: str) -> Device:
    data = tmp_path / "data"
    child = subprocess.run(
        [sys.executable, "-m", "tests.crash.journal_order_child", str(data), moment],
        cwd=REPO, capture_output=True, timeout=120)
    assert child.returncode == -9, child.stderr.decode()[-3000:]
    return Device(str(data))


def test_crash_before_the_split_record_leaves_older_generations_alone(tmp_path: Path) -> None:
    device = _crash_in_apply_split(tmp_path, "before")
    try:
        volume = device.get_lu("lu").volume
        live = {m.gen: m for m in volume.live_generations()}
        if 1 in live:
            assert _read(volume.generation_view(1), OFFSET) == b"A", (
                f"generation 1 (member {live[1].idx}) changed by the crash")
        assert _read(volume.generation_view(2), OFFSET) == b"B"
    finally:
        device.close()


def test_crash_after_the_split_record_resyncs_the_new_active_backup(tmp_path: Path) -> None:
    """Invariant 2 after a split completed at start-up.

    The journal noted t3 (member 0, generation 1 with "A", to become the active
    backup) but the crash came before member 0's pending file was rewritten.  The
    primary holds "B": once in sync, the active backup must too, and so must the
    generation the next trigger makes.
    """
    device = _crash_in_apply_split(tmp_path, "after")
    try:
        volume = device.get_lu("lu").volume
        assert volume.active is not None
        deadline = time.monotonic() + 10
        while volume.active.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not volume.active.pending
        active = bytearray(4096)
        volume.active.store.read_into(memoryview(active), OFFSET)
        assert active[:1] == b"B", (
            f"active backup (member {volume.active.idx}) reads {active[:1]!r} after the"
            " restart, the primary b'B'")
        made = device.triggers.trigger(["lu"], "after-restart")[0]
        assert _read(volume.generation_view(made["gen"]), OFFSET) == b"B"
    finally:
        device.close()


def test_a_group_split_cut_short_is_completed_and_logged_once(tmp_path: Path) -> None:
    """Start-up completes a consistency group's split LU by LU under one trigger id:
    the device opens, and the trigger log holds one row naming both LUs."""
    device = _crash_inside_split(tmp_path, "group")
    try:
        (row,) = [t for t in device.catalog.triggers() if t["label"] == "t3"]
        assert row["lus"].split(",") == ["lu", "lu2"]
        assert row["outcome"] == "ok"
    finally:
        device.close()
