"""State-machine test of a mirrored LU against an in-memory model.

Random writes, zeroes and trims (several in flight at once, overlapping, run in
shuffled thread order), triggers by every mechanism, pins, exports, restores
and pool-size changes.  After every step: the primary equals the model; every
generation equals the model as of its trigger (invariant 1); an in-sync active
backup equals the primary (invariant 2); a recycled backup copies no more than
what changed since its split (invariant 4).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import threading

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pyroaring import BitMap

from mirrorpool.device.device import Device
from mirrorpool.device.exports import (
    GenerationExport,
    PrimaryExport,
    TriggerLuExport,
    TriggerPathExport,
)
from mirrorpool.errors import Conflict
from mirrorpool.mirror.changes import CHUNK
from mirrorpool.mirror.pool import MemberState
from mirrorpool.mirror.volume import TriggerRefused
from mirrorpool.nbd.codec import Command
from mirrorpool.nbd.constants import Cmd

SIZE = 16 * CHUNK
NAME = "m"

offsets = st.integers(0, SIZE - 1)
lengths = st.integers(1, 3 * CHUNK)
byte_values = st.integers(1, 255)
op_kinds = st.sampled_from(["write", "write", "zero", "trim"])
mechanisms = st.sampled_from(["api", "in-band", "path", "trigger-lu"])


def _clip(offset: int, length: int) -> tuple[int, int]:
    return offset, min(length, SIZE - offset)


class MirrorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="mp-model-")
        self.device = Device(self.dir)
        self.pool = 3
        self.lu = self.device.create_lu(NAME, SIZE, pool=self.pool)
        self.lu.volume.pause_resync(True)
        self.model = bytearray(SIZE)
        self.gens: dict[int, bytes] = {}
        self.written_since: dict[int, BitMap] = {}  # gen -> chunks written after it
        self.exports: list[GenerationExport] = []

    def teardown(self) -> None:
        for export in self.exports:
            export.detach()
        self.device.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def volume(self):  # type: ignore[no-untyped-def]
        return self.lu.volume

    # ------------------------------------------------------------ mutations

    def _apply_model(self, kind: str, offset: int, length: int, value: int) -> None:
        fill = value if kind == "write" else 0
        self.model[offset : offset + length] = bytes([fill]) * length
        first, stop = offset // CHUNK, (offset + length + CHUNK - 1) // CHUNK
        for chunks in self.written_since.values():
            chunks.add_range(first, stop)

    def _execute(self, op, kind: str, offset: int, length: int, value: int) -> None:  # type: ignore[no-untyped-def]
        if kind == "write":
            self.volume.write(op, bytes([value]) * length, offset)
        elif kind == "zero":
            self.volume.zero(op, offset, length, may_trim=False)
        else:
            self.volume.trim(op, offset, length)

    @rule(kind=op_kinds, offset=offsets, length=lengths, value=byte_values)
    def mutate(self, kind: str, offset: int, length: int, value: int) -> None:
        offset, length = _clip(offset, length)
        op = self.volume.begin(offset, length)
        self._execute(op, kind, offset, length, value)
        self._apply_model(kind, offset, length, value)

    @rule(
        batch=st.lists(st.tuples(op_kinds, offsets, lengths, byte_values), min_size=2,
                       max_size=6),
        trigger_at=st.one_of(st.none(), st.integers(0, 6)),
        seed=st.integers(0, 2**16),
    )
    def concurrent_batch(self, batch, trigger_at, seed) -> None:  # type: ignore[no-untyped-def]
        """Admit in order, run in shuffled threads, maybe with a TRIGGER in the middle."""
        admitted = []
        pending = None
        snapshot = None
        for i, (kind, offset, length, value) in enumerate(batch):
            if trigger_at == i:
                try:
                    pending = self.device.triggers.begin([NAME], "batch", "api")
                    snapshot = bytes(self.model)
                except TriggerRefused:
                    pending = None
            offset, length = _clip(offset, length)
            admitted.append((self.volume.begin(offset, length), kind, offset, length, value))
            self._apply_model(kind, offset, length, value)
        # the model is the effect in admission order; run them in any order at once
        order = list(admitted)
        random.Random(seed).shuffle(order)
        threads = [threading.Thread(target=self._execute, args=a) for a in order]
        for t in threads:
            t.start()
        if pending is not None:
            answers = self.device.triggers.complete(pending)
            self._record_generation(answers[0]["gen"], snapshot, after=admitted)
        for t in threads:
            t.join(30)
            assert not t.is_alive()

    # ------------------------------------------------------------ triggers

    def _record_generation(self, gen: int, content: bytes | None, after=()) -> None:  # type: ignore[no-untyped-def]
        assert content is not None
        self.gens[gen] = content
        changed = BitMap()
        # mutations admitted after the trigger in this batch changed chunks since gen
        for op, _kind, offset, length, _value in after:
            if op.seq is not None and op.seq > self.volume.member_of(gen).frozen_seq:
                changed.add_range(offset // CHUNK, (offset + length + CHUNK - 1) // CHUNK)
        self.written_since[gen] = changed
        live = {m.gen for m in self.volume.live_generations()}
        for g in list(self.gens):
            if g not in live:
                del self.gens[g]
                self.written_since.pop(g, None)

    @rule(mechanism=mechanisms, label=st.text("abc xyz", max_size=8))
    def trigger(self, mechanism: str, label: str) -> None:
        before = {m.gen for m in self.volume.live_generations()}
        holders = {m.idx: (m.gen, len(m.pending)) for m in self.volume.live_generations()}
        snapshot = bytes(self.model)
        try:
            gen = self._trigger_by(mechanism, label)
        except TriggerRefused:
            assert {m.gen for m in self.volume.live_generations()} == before
            return
        active = self.volume.active
        if active is not None and active.idx in holders:
            # invariant 4: recycling copies only what changed since that member's split
            old_gen, old_pending = holders[active.idx]
            assert active.copy_total <= len(self.written_since[old_gen]) + old_pending
        self._record_generation(gen, snapshot)

    def _trigger_by(self, mechanism: str, label: str) -> int:
        device = self.device
        payload = memoryview(label.encode())
        if mechanism == "api":
            return device.triggers.trigger([NAME], label, "api")[0]["gen"]
        if mechanism == "in-band":
            export = PrimaryExport(device, self.lu)
            cmd = Command(0, Cmd.TRIGGER, 1, 0, len(payload), len(payload))
            ticket = export.admit(cmd, payload)
            return export.trigger(ticket)["generations"][0]["gen"]
        if mechanism == "path":
            export = TriggerPathExport(device, self.lu)
        else:
            export = TriggerLuExport(device)
            payload = memoryview(f"MPTRIGGER 1\nlu {NAME}\nlabel {label}\n".encode())
        cmd = Command(0, Cmd.WRITE, 1, 0, len(payload), len(payload))
        ticket = export.admit(cmd, payload)
        export.write(ticket, payload, 0, False)
        buf = bytearray(4096)
        export.read_into(memoryview(buf), 0)
        return json.loads(buf.rstrip(b"\0"))["generations"][0]["gen"]

    # ------------------------------------------------------------ pool management

    @precondition(lambda self: bool(self.gens))
    @rule(data=st.data(), pinned=st.booleans())
    def pin(self, data, pinned: bool) -> None:  # type: ignore[no-untyped-def]
        gen = data.draw(st.sampled_from(sorted(self.gens)))
        self.device.backups.pin(NAME, gen, pinned)
        if not pinned:
            self.volume.ensure_active()

    @precondition(lambda self: bool(self.gens))
    @rule(data=st.data())
    def open_export(self, data) -> None:  # type: ignore[no-untyped-def]
        gen = data.draw(st.sampled_from(sorted(self.gens)))
        export = GenerationExport(self.device, self.lu, gen)
        export.attach()
        self.exports.append(export)

    @precondition(lambda self: bool(self.exports))
    @rule()
    def close_export(self) -> None:
        self.exports.pop(0).detach()
        self.volume.ensure_active()

    @precondition(lambda self: bool(self.gens))
    @rule(data=st.data())
    def restore(self, data) -> None:  # type: ignore[no-untyped-def]
        gen = data.draw(st.sampled_from(sorted(self.gens)))
        rewritten = self.volume.changes.since(gen)
        self.device.backups.restore(NAME, gen, force=True)
        for chunks in self.written_since.values():
            chunks |= rewritten
        self.model[:] = self.gens[gen]

    @rule(size=st.integers(1, 5))
    def set_pool(self, size: int) -> None:
        try:
            self.device.backups.set_pool(NAME, size)
        except Conflict:
            return
        live = {m.gen for m in self.volume.live_generations()}
        for g in list(self.gens):
            if g not in live:
                del self.gens[g]
                self.written_since.pop(g, None)

    @rule(paused=st.booleans())
    def pause_resync(self, paused: bool) -> None:
        """Held-back resync keeps chunks pending, so copy-before-write must keep them exact."""
        self.volume.pause_resync(paused)

    @rule()
    def wait_for_resync(self) -> None:
        self.volume.pause_resync(False)
        for _ in range(2000):
            if not any(m.pending for m in self.volume.members
                       if m.state in (MemberState.ACTIVE, MemberState.GENERATION)):
                return
            threading.Event().wait(0.002)
        raise AssertionError("resync did not finish")

    # ------------------------------------------------------------ invariants

    @invariant()
    def primary_matches_model(self) -> None:
        buf = bytearray(SIZE)
        self.volume.primary.read_into(memoryview(buf), 0)
        assert buf == self.model

    @invariant()
    def generations_are_exact(self) -> None:
        live = {m.gen for m in self.volume.live_generations()}
        assert set(self.gens) == live
        for gen, expected in self.gens.items():
            buf = bytearray(SIZE)
            self.volume.generation_view(gen).read_into(memoryview(buf), 0)
            if buf != expected:
                bad = next(i for i in range(SIZE) if buf[i] != expected[i])
                raise AssertionError(f"generation {gen} differs at byte {bad}")

    @invariant()
    def in_sync_backup_equals_primary(self) -> None:
        active = self.volume.active
        if active is None:
            return
        with self.volume.seq.lock:
            if active.pending:
                return
            buf = bytearray(SIZE)
            active.store.read_into(memoryview(buf), 0)
        assert buf == self.model



MirrorMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMirrorModel = MirrorMachine.TestCase
