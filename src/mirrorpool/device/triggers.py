"""Triggers: one code path for every mechanism (trigger LU, special path, in-band, API).

A trigger naming several LUs is a consistency group: the sequencer locks of
all of them are held together while each gets its TRIGGER, so the cut is one
point for all.  Locks are taken in name order, so two groups cannot deadlock.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mirrorpool.device.volumes import save_split, split_committed
from mirrorpool.errors import InvalidRequest
from mirrorpool.mirror.pool import MemberState
from mirrorpool.mirror.volume import SplitPlan, TriggerRefused

if TYPE_CHECKING:
    from mirrorpool.device.device import Device, LogicalUnit

log = logging.getLogger("mirrorpool.trigger")

MAX_LABEL = 256
SOURCES = ("trigger-lu", "path", "in-band", "api", "cli", "restore", "link")


def generation_info(lu: str, member, record=None) -> dict:  # type: ignore[no-untyped-def]
    state = "splitting" if not member.split_done.is_set() else (
        "syncing" if member.pending else "ready")
    info = {
        "lu": lu,
        "gen": member.gen,
        "member": member.idx,
        "state": state,
        "pinned": member.pinned,
        "readers": member.readers,
    }
    if record is not None:
        info.update(seq=record.seq, trigger_id=record.trigger_id, label=record.label,
                    source=record.source, created=record.created)
    return info


def check_label(label: str) -> str:
    if len(label.encode()) > MAX_LABEL:
        raise InvalidRequest(f"label is longer than {MAX_LABEL} bytes")
    if any(ord(ch) < 32 for ch in label):
        raise InvalidRequest("label must not contain control characters")
    return label


@dataclass
class PendingTrigger:
    id: str
    label: str
    source: str
    received_wall: float
    received: float
    lus: list[LogicalUnit] = field(default_factory=list)
    plans: list[SplitPlan] = field(default_factory=list)
    recycled: dict[str, list[int]] = field(default_factory=dict)
    # a TRIGGER forwarded by the device this LU replicates: its id, seq and generation there
    origin: dict | None = None
    existing: list[dict] | None = None  # the same forwarded TRIGGER again: its answers
    replicated: dict[str, bool] = field(default_factory=dict)


class TriggerService:
    def __init__(self, device: Device) -> None:
        self.device = device

    def trigger(self, names: list[str], label: str = "", source: str = "api") -> list[dict]:
        """Split every named LU at one cut; answers the generations made, in name order."""
        return self.complete(self.begin(names, label, source))

    def begin(self, names: list[str], label: str = "", source: str = "api",
              origin: dict | None = None) -> PendingTrigger:
        """Place the TRIGGER in each LU's sequence now; never waits for I/O.

        ``origin``: a TRIGGER forwarded by a replication link, which keeps its id;
        sent again after the link resumed, it is answered with the same generation.
        """
        trigger_id = str(origin["trigger_id"])[:16] if origin else uuid.uuid4().hex[:16]
        pending = PendingTrigger(trigger_id, label, source, time.time(), time.monotonic(),
                                 origin=origin)
        check_label(label)
        if origin is not None and len(names) == 1:
            done = self.device.catalog.generation_by_trigger(names[0], trigger_id)
            if done is not None:
                pending.existing = [{
                    "lu": names[0], "gen": done.gen, "seq": done.seq, "trigger_id": trigger_id,
                    "label": done.label, "source": done.source, "created": done.created,
                    "member": done.member, "split_ms": 0.0, "settle_ms": 0.0,
                    "duplicate": True,
                }]
                return pending
        if not names:
            raise InvalidRequest("a trigger must name at least one LU")
        unique = sorted(set(names))
        pending.lus = [self.device.get_lu(name) for name in unique]  # NotFound if unknown
        try:
            with ExitStack() as stack:
                for lu in pending.lus:
                    stack.enter_context(lu.volume.seq.lock)
                pending.plans = [lu.volume.plan_split() for lu in pending.lus]
                for lu, plan in zip(pending.lus, pending.plans, strict=True):
                    plan.received = pending.received
                    pending.recycled[lu.name] = [
                        m.gen for m in (plan.gen_member, plan.next_active)
                        if m is not None and m.state is MemberState.GENERATION and m.gen is not None
                    ]
                    plan.trigger_id, plan.label, plan.source = pending.id, label, source
                    plan.created = pending.received_wall
                    plan.recycled = pending.recycled[lu.name]
                    lu.volume.apply_split(plan)
                    replicator = self.device.remotes.replicator(lu.name)
                    if replicator is not None:
                        assert plan.op is not None
                        pending.replicated[lu.name] = replicator.on_trigger(
                            plan.op.seq or 0, pending.id, label, plan.gen)
        except TriggerRefused as exc:
            self.device.catalog.log_trigger(pending.id, unique, [], source, label,
                                            pending.received_wall, "refused", str(exc))
            log.warning("trigger refused", extra={"trigger": pending.id, "lus": ",".join(unique),
                                                  "why": str(exc)})
            raise
        except BaseException:
            self._tell_links(pending, False)
            raise
        return pending

    def _tell_links(self, pending: PendingTrigger, ok: bool) -> None:
        """The replication links that journalled this TRIGGER may send it (or never)."""
        for lu, plan in zip(pending.lus, pending.plans, strict=False):
            if pending.replicated.get(lu.name) and plan.op is not None:
                replicator = self.device.remotes.replicator(lu.name)
                if replicator is not None:
                    replicator.trigger_done(plan.op.seq or 0, ok)

    def complete(self, pending: PendingTrigger) -> list[dict]:
        """Wait for the TRIGGER to reach the head of each queue, make it durable, answer."""
        if pending.existing is not None:
            return pending.existing
        try:
            answers = self._complete(pending)
        except BaseException:
            self._tell_links(pending, False)
            raise
        self._tell_links(pending, True)
        return answers

    def _complete(self, pending: PendingTrigger) -> list[dict]:
        for plan in pending.plans:
            plan.volume.finish_split(plan)  # readable from here on
        seqs = [plan.op.seq or 0 for plan in pending.plans if plan.op is not None]
        names = [lu.name for lu in pending.lus]
        for lu in pending.lus:
            if pending.replicated.get(lu.name):
                # a forwarded TRIGGER answered here must survive a crash here
                replicator = self.device.remotes.replicator(lu.name)
                if replicator is not None:
                    replicator.journal.persist()
                    if self.device.journal_sync:
                        replicator.sync_journal()
        if self.device.journal_sync:
            # power-loss safe mode: the generation's data is on disk before it is answered
            for plan in pending.plans:
                plan.gen_member.store.flush()
                if plan.gen_member.pending:
                    plan.volume.primary.flush()
        with self.device.catalog.transaction():  # durable in one commit before the answer
            for lu, plan in zip(pending.lus, pending.plans, strict=True):
                save_split(self.device.catalog, lu.volume, plan, pending.id, pending.label,
                           pending.source, pending.received_wall, pending.recycled[lu.name])
            self.device.catalog.log_trigger(pending.id, names, seqs, pending.source,
                                            pending.label, pending.received_wall, "ok")
            if pending.origin is not None:
                for lu, plan in zip(pending.lus, pending.plans, strict=True):
                    self.device.catalog.add_origin(
                        lu.name, plan.gen, int(pending.origin.get("origin_seq") or 0),
                        pending.origin.get("origin_gen"))
        for lu, plan in zip(pending.lus, pending.plans, strict=True):
            split_committed(lu.volume, plan.gen)
        answers = []
        for lu, plan in zip(pending.lus, pending.plans, strict=True):
            answer = {
                "lu": lu.name,
                "gen": plan.gen,
                "seq": plan.op.seq if plan.op else None,
                "trigger_id": pending.id,
                "label": pending.label,
                "source": pending.source,
                "created": pending.received_wall,
                "member": plan.gen_member.idx,
                "split_ms": round(plan.split_s * 1000, 3),
                "settle_ms": round(plan.settle_s * 1000, 3),
            }
            if lu.name in pending.replicated:
                answer["replicated"] = pending.replicated[lu.name]
            lu.volume.last_trigger = answer
            answers.append(answer)
        log.info("trigger", extra={"trigger": pending.id, "lus": ",".join(names),
                                   "source": pending.source, "seqs": ",".join(map(str, seqs))})
        return answers
