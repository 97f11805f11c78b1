"""Crash safety: nothing acknowledged is lost, nothing divergent is skipped.

DESIGN.md invariants 1 (prefix consistency), 2 (mirror equality) and 5 (nothing
acknowledged is lost; recovery resyncs what may differ and never alters a
generation), checked by SIGKILL-ing a real device under concurrent writes and
triggers, restarting it and comparing what it holds with what the hosts were told.
See tests/crash/harness.py for what is checked exactly.

MIRRORPOOL_CRASH_CYCLES (default 20) and MIRRORPOOL_CRASH_SEED choose the run;
bench/crash_soak.py runs the same harness for hundreds of cycles.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.crash.harness import BLOCK, CrashHarness, HarnessConfig

CYCLES = int(os.environ.get("MIRRORPOOL_CRASH_CYCLES", "20"))


def _seed() -> int:
    return int(os.environ.get("MIRRORPOOL_CRASH_SEED") or random.randrange(1 << 31))


def _examples(harness: CrashHarness, n: int = 15) -> str:
    return "\n".join(json.dumps(e, default=str)[:1500] for e in harness.report.examples[:n])


@pytest.mark.timeout(1200)
def test_crash_cycles_lose_nothing_and_skip_nothing(tmp_path: Path) -> None:
    seed = _seed()
    print(f"crash harness: {CYCLES} cycles, seed {seed}")
    config = HarnessConfig(seed=seed, load_seconds=(0.3, 1.0))
    with CrashHarness(tmp_path, config) as harness:
        report = harness.run(CYCLES, on_cycle=lambda r: print(r.line(), flush=True))
        summary = report.summary()
        print(summary)
        assert report.cycles == CYCLES
        # the checks checked something: durable writes, generations, equality
        assert report.durable_checked > 0
        assert report.triggers_acked > 0
        assert report.gens_prefix_checked + report.gens_unacked_checked > 0
        assert report.gens_hash_checked >= CYCLES  # at least the pinned canary, every cycle
        assert report.equality_checks == CYCLES
        assert report.total_violations == 0, f"{summary}\n{_examples(harness)}"


# ------------------------------------------------------------ calibration
#
# The same harness against faults planted behind the device's back: each class of
# check must see its fault, or a pass above would mean nothing.


def _calibration(tmp_path: Path) -> CrashHarness:
    config = HarnessConfig(seed=_seed(), load_seconds=(0.4, 0.6), early_kill_fraction=0.0)
    return CrashHarness(tmp_path, config, log=print)


def _zero_block(path: Path, slot: int) -> None:
    with open(path, "r+b") as f:
        f.seek(slot * BLOCK)
        f.write(bytes(BLOCK))


@pytest.mark.timeout(300)
def test_harness_sees_a_lost_durable_write(tmp_path: Path) -> None:
    lost: list[int] = []

    def drop_last_durable_write(h: CrashHarness) -> None:
        flush = max((f.send for f in h.last_flushes if f.ack is not None), default=0.0)
        durable = [w for w in h.last_writes
                   if w.ack is not None and (w.fua or w.ack < flush) and w.slot >= 2048]
        last = max(durable, key=lambda w: w.send)  # its slot has no later write
        if any(w.slot == last.slot and w.send > last.send for w in h.last_writes):
            return
        _zero_block(h.data_file(), last.slot)
        lost.append(last.slot)

    with _calibration(tmp_path) as harness:
        harness.after_kill = drop_last_durable_write
        report = harness.run(3)
        print(report.summary())
    assert lost, "no durable write to drop"
    primary = [e for e in report.examples if e.get("where") == "primary"]
    assert {e["slot"] for e in primary} == set(lost), _examples(harness)


@pytest.mark.timeout(300)
def test_harness_sees_a_changed_generation(tmp_path: Path) -> None:
    with _calibration(tmp_path) as harness:
        gen = harness.canary_gen
        member = next(g["member"] for g in harness.generations() if g["gen"] == gen)
        slot = next(s for s, ident in enumerate(harness.baseline_idents) if ident is not None)
        harness.after_kill = lambda h: _zero_block(h.data_file(member), slot)
        report = harness.run(1)
        print(report.summary())
    changed = [e for e in report.examples if e["kind"] == "generation-changed"]
    assert gen in [e["gen"] for e in changed], _examples(harness)
    (canary,) = [e for e in changed if e["gen"] == gen]
    assert canary["count"] == 1 and canary["details"][0]["slot"] == slot


@pytest.mark.timeout(300)
def test_harness_sees_a_diverging_mirror(tmp_path: Path) -> None:
    def damage_active(h: CrashHarness) -> None:
        member = h.mirror_status()["active_member"]
        with open(h.data_file(member), "r+b") as f:
            f.seek(h.config.size - BLOCK)  # the last slot: the device's page cache sees it
            f.write(b"\xa5" * BLOCK)

    with _calibration(tmp_path) as harness:
        harness.before_verify = damage_active
        report = harness.run(1)
        print(report.summary())
    assert report.violations["mirror-differs"] == 1, _examples(harness)
    (example,) = [e for e in report.examples if e["kind"] == "mirror-differs"]
    assert (harness.config.size // BLOCK) - 1 in example["differing_slots"]
