"""Helpers for the interop tests: bounded subprocesses and allocation maps."""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Target

KiB = 1 << 10
MiB = 1 << 20

# base:allocation flags (NBD_STATE_HOLE, NBD_STATE_ZERO)
HOLE = 1
ZERO = 2


def run(
    cmd: list[str], *, timeout: float = 60, check: bool = True, input: bytes | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run a client program with a time limit; on failure show what it printed."""
    result = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {result.returncode}\n"
            f"stdout: {result.stdout.decode(errors='replace')}\n"
            f"stderr: {result.stderr.decode(errors='replace')}"
        )
    return result


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def lu_name(target: Target) -> str:
    """The LU behind a mirrorpool target (its export name)."""
    assert target.kind == "mirrorpool"
    return target.uri.rsplit("/", 1)[1]


def xfail_on(request: pytest.FixtureRequest, target: Target, kind: str, reason: str) -> None:
    """Mark this test's run on one kind of server as a known, strict failure."""
    if target.kind == kind:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))


def wait_until(predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


@dataclass(frozen=True)
class Run:
    """One run of an allocation map: [offset, offset+length) with flag bits."""

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def check_coverage(runs: list[Run], size: int) -> None:
    """The runs must tile [0, size) exactly, in order, with no empty run."""
    assert runs, "empty allocation map"
    pos = 0
    for r in runs:
        assert r.offset == pos, f"map has a gap or overlap at {pos}: {runs}"
        assert r.length > 0, f"empty run in map: {runs}"
        pos = r.end
    assert pos == size, f"map covers {pos} bytes, export has {size}"


def overlapping(runs: list[Run], start: int, end: int) -> list[Run]:
    found = [r for r in runs if r.offset < end and r.end > start]
    assert found, f"no run covers [{start}, {end}) in {runs}"
    return found


def assert_flags(runs: list[Run], start: int, end: int, *, hole: bool | None = None,
                 zero: bool | None = None) -> None:
    """Every run overlapping [start, end) has (or lacks) the HOLE / ZERO bits."""
    for r in overlapping(runs, start, end):
        if hole is not None:
            assert bool(r.flags & HOLE) == hole, (
                f"[{start}, {end}) expected hole={hole}, got run {r} in {runs}"
            )
        if zero is not None:
            assert bool(r.flags & ZERO) == zero, (
                f"[{start}, {end}) expected zero={zero}, got run {r} in {runs}"
            )


def nbdinfo_map(uri: str) -> list[Run]:
    """`nbdinfo --map --json` (base:allocation) as runs."""
    out = run(["nbdinfo", "--map", "--json", uri], timeout=30).stdout
    return [Run(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def qemu_img_map(uri: str) -> list[Run]:
    """`qemu-img map --output=json` as runs, flags rebuilt from data/zero."""
    out = run(["qemu-img", "map", "--output=json", "-f", "raw", uri], timeout=30).stdout
    runs = []
    for e in json.loads(out):
        flags = (0 if e["data"] else HOLE) | (ZERO if e["zero"] else 0)
        runs.append(Run(e["start"], e["length"], flags))
    return runs
