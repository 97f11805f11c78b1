"""Triggers fired while several hosts write: every generation is an exact prefix cut.

Writers, each on its own python3-libnbd connection to one LU, write 4 KiB blocks that
encode (writer, slot, sequence number) into their own slots and into slots they share.
Every write logs when it was sent and when it was acknowledged.  Meanwhile a trigger
thread fires triggers every 10-20 ms (API, in-band, special path, trigger LU), logging when each
was sent and answered, and pins a few generations so they outlive the recycling.

Then every generation still live is read and checked (DESIGN invariant 1):
  * every block is one write whole (no torn 4 KiB block) or never written;
  * no write sent after the trigger was answered is in it;
  * for every write acknowledged before the trigger was sent, the slot holds that
    write or one not known to be older (not acknowledged before that write was sent);
  * per writer, it is a prefix: with m the newest write of a writer seen anywhere in
    the generation, each of the writer's own slots holds its last write there up to m.
"""

from __future__ import annotations

import json
import random
import struct
import threading
import time
from dataclasses import dataclass, field

import pytest

from mirrorpool.nbd.client import NbdClient
from tests.conftest import need
from tests.helpers.processes import DeviceProcess
from tests.interop import rawnbd
from tests.mirror_support import (
    TRIGGER_CMD,
    KiB,
    MiB,
    api,
    api_trigger,
    assert_identical,
    close,
    connect,
    generations,
    nul_json,
    pin,
    read_export,
    read_reply,
    request,
    trigger_record,
    wait_in_sync,
)

BLOCK = 4 * KiB
SIZE = 1 * MiB
SLOTS = SIZE // BLOCK  # 256
WRITERS = 4
OWN = 48  # slots [w * OWN, (w + 1) * OWN) belong to writer w alone
SHARED = range(WRITERS * OWN, SLOTS)  # every writer writes these
RUN_SECONDS = 2.5
POOL = 8  # active backup + 7 generations
PIN_AT = (2, 10, 22, 38, 60)  # triggers whose generations are pinned (5 of 7)

RECORD = struct.Struct(">HHIQ")  # magic, writer, slot, sequence number
MAGIC = 0x4D57


def block(writer: int, slot: int, n: int) -> bytes:
    return RECORD.pack(MAGIC, writer, slot, n) * (BLOCK // RECORD.size)


@dataclass
class Write:
    writer: int
    n: int
    slot: int
    sent: float
    acked: float


@dataclass
class Trigger:
    i: int
    source: str
    sent: float
    answered: float = 0.0
    gen: int | None = None
    error: str | None = None


@dataclass
class Log:
    writes: list[list[Write]] = field(default_factory=lambda: [[] for _ in range(WRITERS)])
    triggers: list[Trigger] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


def own_slots(writer: int) -> range:
    return range(writer * OWN, (writer + 1) * OWN)


def run_writer(uri: str, writer: int, stop: threading.Event, log: Log) -> None:
    rng = random.Random(writer)
    mine = own_slots(writer)
    out = log.writes[writer]
    try:
        h = connect(uri)
        n = 0
        while not stop.is_set():
            n += 1
            slot = rng.choice(SHARED) if rng.random() < 0.25 else rng.choice(mine)
            data = block(writer, slot, n)
            sent = time.monotonic()
            h.pwrite(data, slot * BLOCK)
            out.append(Write(writer, n, slot, sent, time.monotonic()))
        close(h)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        log.errors.append(exc)


def run_triggers(device: DeviceProcess, name: str, stop: threading.Event, log: Log) -> None:
    rng = random.Random(99)
    try:
        in_band = NbdClient(device.uri(name), contexts=("mirrorpool:trigger",))
        path = connect(device.uri(f"{name}:trigger"))
        record = connect(device.uri(".trigger"))
        i = 0
        while not stop.is_set():
            i += 1
            kind = ("api", "api", "api", "api", "in-band", "in-band", "path", "trigger-lu")[i % 8]
            t = Trigger(i, kind, time.monotonic())
            if kind == "api":
                status, body = device.request("POST", f"/v1/lus/{name}/trigger",
                                              {"label": f"t{i}"})
                t.answered = time.monotonic()
                if status == 200:
                    t.gen = body["generations"][0]["gen"]  # type: ignore[index]
                else:
                    t.error = f"{status} {body}"
            elif kind == "in-band":
                answer = in_band.trigger(f"t{i}")
                t.answered = time.monotonic()
                t.gen = answer["generations"][0]["gen"]
            elif kind == "path":
                path.pwrite(f"t{i}".encode().ljust(512, b"\0"), 0)
                t.answered = time.monotonic()
                t.gen = nul_json(path.pread(4096, 0))["generations"][0]["gen"]
            else:
                record.pwrite(trigger_record(name, label=f"t{i}"), 0)
                t.answered = time.monotonic()
                t.gen = nul_json(record.pread(4096, 0))["generations"][0]["gen"]
            log.triggers.append(t)
            if i in PIN_AT and t.gen is not None:
                pin(device, name, t.gen)
            time.sleep(rng.uniform(0.010, 0.020))
        in_band.close()
        close(path)
        close(record)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        log.errors.append(exc)


def decode(raw: bytes, slot: int) -> tuple[int, int] | None:
    """(writer, n) of a whole block, None for a never-written one; AssertionError if torn."""
    if raw == bytes(BLOCK):
        return None
    first = raw[: RECORD.size]
    assert raw == first * (BLOCK // RECORD.size), f"slot {slot} is torn or foreign: {raw[:64]!r}"
    magic, writer, got_slot, n = RECORD.unpack(first)
    assert (magic, got_slot) == (MAGIC, slot) and writer < WRITERS, (slot, magic, got_slot)
    return writer, n


def check_generation(content: bytes, trigger: Trigger, log: Log) -> list[str]:
    """What is wrong with one generation, as sentences (empty: it is an exact prefix cut)."""
    problems: list[str] = []
    by_id = {(w.writer, w.n): w for ws in log.writes for w in ws}
    per_slot: dict[int, list[Write]] = {}
    for ws in log.writes:
        for w in ws:
            per_slot.setdefault(w.slot, []).append(w)
    seen: dict[int, Write | None] = {}
    for slot in range(SLOTS):
        try:
            got = decode(content[slot * BLOCK : (slot + 1) * BLOCK], slot)
        except AssertionError as exc:
            problems.append(str(exc))
            continue
        if got is None:
            seen[slot] = None
            continue
        write = by_id.get(got)
        if write is None or write.slot != slot:
            problems.append(f"slot {slot} holds {got}, never written there")
            continue
        seen[slot] = write
        if write.sent > trigger.answered:
            problems.append(f"slot {slot} holds write {got}, sent "
                            f"{write.sent - trigger.answered:.4f}s after the trigger was answered")
    # every write acknowledged before the trigger was sent is there (or a newer one)
    for slot, writes in per_slot.items():
        if slot not in seen:
            continue
        acked_before = [w for w in writes if w.acked < trigger.sent]
        if not acked_before:
            continue
        newest_sent = max(w.sent for w in acked_before)
        value = seen[slot]
        if value is None or value.acked < newest_sent:
            problems.append(f"slot {slot} holds {value and (value.writer, value.n)}, older than"
                            " a write acknowledged before the trigger was sent")
    # per writer, a prefix of its (strictly sequential) writes
    for writer in range(WRITERS):
        newest = max((w.n for w in seen.values() if w is not None and w.writer == writer),
                     default=0)
        last: dict[int, Write] = {}
        for w in log.writes[writer]:
            if w.n <= newest:
                last[w.slot] = w
        for slot in own_slots(writer):
            if slot not in seen:
                continue
            want = last.get(slot)
            value = seen[slot]
            if (want and (want.writer, want.n)) != (value and (value.writer, value.n)):
                problems.append(
                    f"writer {writer}: its write {newest} is in the generation, but its own slot"
                    f" {slot} holds {value and value.n} instead of {want and want.n}")
        for slot in SHARED:
            want = last.get(slot)
            value = seen.get(slot)
            if want is not None and (value is None or value.acked < want.sent):
                problems.append(f"shared slot {slot}: writer {writer}'s write {want.n} is in the"
                                f" prefix but the slot holds an older write")
    return problems


@pytest.fixture(autouse=True)
def _programs() -> None:
    need("qemu-img")


@pytest.fixture
def lu(device: DeviceProcess):  # type: ignore[no-untyped-def]
    name = f"conc-{time.monotonic_ns()}"
    api(device, "POST", "/v1/lus", {"name": name, "size": SIZE, "pool": POOL}, expect=201)
    yield name
    api(device, "DELETE", f"/v1/lus/{name}?force=true", expect=204)


def test_triggers_under_concurrent_writers_are_exact_prefix_cuts(
    device: DeviceProcess, lu: str
) -> None:
    log = Log()
    stop_writes, stop_triggers = threading.Event(), threading.Event()
    uri = device.uri(lu)
    writers = [threading.Thread(target=run_writer, args=(uri, w, stop_writes, log), daemon=True)
               for w in range(WRITERS)]
    trigger_thread = threading.Thread(target=run_triggers,
                                      args=(device, lu, stop_triggers, log), daemon=True)
    for t in writers:
        t.start()
    time.sleep(0.05)
    trigger_thread.start()
    time.sleep(RUN_SECONDS)
    stop_triggers.set()
    trigger_thread.join(30)
    stop_writes.set()
    for t in writers:
        t.join(30)
    assert not log.errors, log.errors
    assert not trigger_thread.is_alive() and not any(t.is_alive() for t in writers)

    refused = [t for t in log.triggers if t.error]
    assert not refused, f"triggers refused: {refused[:3]}"
    writes = sum(len(ws) for ws in log.writes)
    # enough triggers to exercise the cuts; how many fit in the time is for bench/, not here
    assert len(log.triggers) >= 10, f"only {len(log.triggers)} triggers in {RUN_SECONDS}s"
    assert writes >= 200 and all(len(ws) >= 20 for ws in log.writes), writes
    # the triggers really raced with writes: some write was in flight during most of them
    all_writes = [w for ws in log.writes for w in ws]
    racing = [t for t in log.triggers
              if any(w.sent < t.answered and w.acked > t.sent for w in all_writes)]
    assert len(racing) >= len(log.triggers) // 2, (len(racing), len(log.triggers))
    assert {t.source for t in log.triggers} == {"api", "in-band", "path", "trigger-lu"}
    gens = [t.gen for t in log.triggers]
    assert gens == sorted(gens) and len(set(gens)) == len(gens), gens

    by_gen = {t.gen: t for t in log.triggers}
    live = generations(device, lu)
    pinned = [g["gen"] for g in live if g["pinned"]]
    assert len(pinned) == len([i for i in PIN_AT if i <= len(log.triggers)]), live
    assert len(live) == POOL - 1, live
    problems = {}
    contents = {}
    for g in live:
        trigger = by_gen[g["gen"]]
        assert g["trigger_id"] and g["label"] == f"t{trigger.i}"
        contents[g["gen"]] = read_export(device.uri(f"{lu}@{g['gen']}"))
        found = check_generation(contents[g["gen"]], trigger, log)
        if found:
            problems[g["gen"]] = found[:5]
    assert not problems, json.dumps(problems, indent=1)

    # Calibration: the check finds a generation checked against the wrong trigger
    # (much earlier or much later), and a torn block.
    first, newest = min(pinned), max(contents)
    assert check_generation(contents[first], log.triggers[-1], log)
    assert check_generation(contents[newest], by_gen[first], log)
    torn = bytearray(contents[newest])
    torn[BLOCK // 2 : BLOCK] = block(WRITERS - 1, 0, 10**6)[BLOCK // 2 :]
    assert any("torn" in p for p in check_generation(bytes(torn), by_gen[newest], log))

    # Mirror equality: with nothing in flight and the active backup in sync, a new
    # generation (the active backup, frozen) equals the primary byte for byte.
    wait_in_sync(device, lu)
    last = api_trigger(device, lu)["gen"]
    assert {g["gen"]: g for g in generations(device, lu)}[last]["state"] == "ready"
    assert_identical(device.uri(f"{lu}@{last}"), uri)


# ---------------------------------------------------------------- in-band ordering

BIG = 256 * KiB


def test_in_band_trigger_is_ordered_after_the_writes_before_it(
    device: DeviceProcess, lu: str
) -> None:
    """On one connection, WRITE; TRIGGER; WRITE sent back to back without waiting: the
    generation holds the first write and not the second, every time."""
    conn = rawnbd.open_export(device.nbd_port, lu, structured=True,
                              contexts=("mirrorpool:trigger",))
    try:
        for i in range(1, 51):
            slot = (i * 37) % (SIZE // BLOCK // 2)
            before, after = bytes([i]) * BLOCK, bytes([i + 100]) * BLOCK
            big_before, big_after = bytes([i]) * BIG, bytes([i + 100]) * BIG
            big_at = SIZE - BIG  # a larger write, slower to finish than the trigger
            label = f"ib{i}".encode()
            c = 10 * i
            burst = (request(c, rawnbd.CMD_WRITE, big_at, big_before)
                     + request(c + 1, rawnbd.CMD_WRITE, slot * BLOCK, before)
                     + request(c + 2, TRIGGER_CMD, 0, label)
                     + request(c + 3, rawnbd.CMD_WRITE, slot * BLOCK, after)
                     + request(c + 4, rawnbd.CMD_WRITE, big_at, big_after))
            conn.send(burst)
            replies = {}
            for _ in range(5):
                cookie, error, body = read_reply(conn)
                assert error == 0, (i, cookie, error, body)
                replies[cookie] = body
            assert sorted(replies) == [c, c + 1, c + 2, c + 3, c + 4]
            answer = json.loads(replies[c + 2])
            (made,) = answer["generations"]
            assert made["source"] == "in-band" and made["label"] == f"ib{i}"
            h = connect(device.uri(f"{lu}@{made['gen']}"))
            try:
                got = h.pread(BLOCK, slot * BLOCK)
                got_big = h.pread(BIG, big_at)
            finally:
                close(h)
            assert got == before, f"round {i}: the generation lacks the write before the trigger"
            assert got_big == big_before, f"round {i}: the large write before is not whole"
        primary = read_export(device.uri(lu))
        assert primary[big_at:] == big_after
        assert primary[slot * BLOCK : (slot + 1) * BLOCK] == after
    finally:
        conn.close()
