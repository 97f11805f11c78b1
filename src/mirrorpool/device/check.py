"""`mirrorpool check`: metadata against data files, in plain words, with optional repair."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from mirrorpool.device.volumes import journal_path, lu_files
from mirrorpool.mirror.pool import MemberState

if TYPE_CHECKING:
    from mirrorpool.device.device import Device


@dataclass
class Problem:
    lu: str
    problem: str
    repair: str
    repaired: bool = False


def check_device(device: Device, repair: bool = False) -> dict:
    problems: list[Problem] = []
    row = device.catalog._db.execute("PRAGMA integrity_check").fetchone()
    if row[0] != "ok":
        problems.append(Problem("", f"catalog damaged: {row[0]}", "restore catalog.sqlite"))
    known: set[str] = set()
    for lu in device.list_lus():
        volume = lu.volume
        indexes = [m.idx for m in volume.members]
        known.update(lu_files(device.data_dir, lu.record.uuid, indexes))
        if lu.record.backing is None:
            known.add(lu.data_path)
        _check_file(problems, lu.name, "primary data", lu.data_path, lu.size, repair)
        for member in volume.members:
            _check_file(problems, lu.name, f"pool member {member.idx}", member.store.path,
                        lu.size, repair)
        if not os.path.exists(journal_path(device.data_dir, lu.record.uuid)):
            problems.append(Problem(lu.name, "crash journal missing",
                                    "recreated at the next start"))
        actives = [m for m in volume.members if m.state is MemberState.ACTIVE]
        if len(actives) > 1:
            problems.append(Problem(lu.name, f"{len(actives)} members marked active",
                                    "none automatic: report this"))
        live = {m.gen for m in volume.live_generations()}
        for record in device.catalog.generations(lu.name):
            if record.gen not in live:
                p = Problem(lu.name, f"generation {record.gen} is listed but no member holds it",
                            "mark it failed")
                if repair:
                    device.catalog.mark_generation(lu.name, record.gen, "failed")
                    p.repaired = True
                problems.append(p)
        failed = [m.idx for m in volume.members if m.state is MemberState.FAILED]
        if failed:
            problems.append(Problem(lu.name, f"pool member(s) {failed} failed",
                                    "`mirrorpool lu repair` resyncs one as active backup"))
    lu_dir = os.path.join(device.data_dir, "lu")
    for name in sorted(os.listdir(lu_dir)):
        path = os.path.join(lu_dir, name)
        if path not in known:
            p = Problem("", f"file {name} belongs to no LU", "delete it")
            if repair:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    p.repaired = True
            problems.append(p)
    unrepaired = [p for p in problems if not p.repaired]
    return {"ok": not unrepaired, "problems": [asdict(p) for p in problems],
            "lus": len(device.list_lus())}


def _check_file(problems: list[Problem], lu: str, what: str, path: str, size: int,
                repair: bool) -> None:
    try:
        actual = os.stat(path).st_size
    except FileNotFoundError:
        problems.append(Problem(lu, f"{what} file {path} is missing", "none automatic"))
        return
    if actual < size and os.path.isfile(path):
        p = Problem(lu, f"{what} file is {actual} bytes, the LU is {size}",
                    "extend it (the missing end reads as zeros)")
        if repair:
            os.truncate(path, size)
            p.repaired = True
        problems.append(p)
