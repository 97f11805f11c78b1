"""`mirrorpool backups NAME`, `backups pin NAME GEN`, `backups unpin NAME GEN`.

Setting up and checking go through the control API and real NBD clients; the CLI runs
only for the command under test.
"""

from __future__ import annotations

import re

from tests.cli.conftest import (
    api_create,
    api_delete,
    assert_refused,
    cli_json,
    flat,
    nbd_session,
    table_header,
    table_rows,
    unique,
)
from tests.helpers.processes import DeviceProcess
from tests.mirror_support import (
    api_trigger,
    gen_numbers,
    generations,
    pin,
    read_export,
    trigger_path,
)

LISTED = {"lu", "gen", "member", "state", "pinned", "readers", "seq", "trigger_id", "label",
          "source", "created"}


def write(device: DeviceProcess, name: str, data: bytes, offset: int) -> None:
    with nbd_session(device.uri(name)) as h:
        h.pwrite(data, offset)


def test_backups_json_lists_generations_oldest_first(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=4)
    try:
        write(device, name, b"\x01" * 4096, 0)
        first = api_trigger(device, name, "one")
        write(device, name, b"\x02" * 4096, 0)
        second = trigger_path(device, name, "two")["generations"][0]
        gens = cli_json(device, "backups", name)
        assert isinstance(gens, list) and len(gens) == 2
        for listed, made in zip(gens, (first, second), strict=True):
            assert set(listed) >= LISTED
            for key in ("lu", "gen", "seq", "trigger_id", "label", "source", "created",
                        "member"):
                assert listed[key] == made[key], (key, listed, made)
            assert listed["state"] == "ready"
            assert listed["pinned"] is False and listed["readers"] == 0
        assert [g["gen"] for g in gens] == [1, 2]
        assert [g["source"] for g in gens] == ["api", "path"]
        assert gens[0]["seq"] < gens[1]["seq"]
        # `backups list NAME` is the same command spelled out
        assert cli_json(device, "backups", "list", name) == gens
    finally:
        api_delete(device, name)


def test_backups_table(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=3)
    try:
        made = api_trigger(device, name, "weekly")
        pin(device, name, made["gen"])
        out = device.cli("backups", name).stdout
        assert table_header(out) == ["gen", "seq", "label", "source", "created", "state",
                                     "pinned", "trigger"]
        (row,) = table_rows(out)
        assert row[:4] == ["1", str(made["seq"]), "weekly", "api"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row[4])
        assert row[5:7] == ["ready", "yes"]
        assert made["trigger_id"].startswith(row[7].rstrip("…"))
    finally:
        api_delete(device, name)


def test_backups_of_an_lu_without_generations(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=2)
    try:
        assert cli_json(device, "backups", name) == []
    finally:
        api_delete(device, name)


def test_backups_of_an_unknown_lu(device: DeviceProcess) -> None:
    missing = unique("missing")
    assert_refused(device.cli("backups", missing, check=False), f"no LU named '{missing}'")
    assert_refused(device.cli("backups", "pin", missing, "1", check=False), "no LU named")


def test_pin_keeps_a_generation_from_being_recycled(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=3)  # active + 2 generations
    try:
        write(device, name, b"\x71" * 4096, 0)
        g1 = api_trigger(device, name)["gen"]
        out = device.cli("backups", "pin", name, str(g1)).stdout
        assert flat(out) == f"pinned {name}@{g1}"
        assert [g["pinned"] for g in generations(device, name)] == [True]
        for i in range(3):
            write(device, name, bytes([0x72 + i]) * 4096, 0)
            api_trigger(device, name)
        # the pinned generation stayed; the others were recycled oldest first
        assert gen_numbers(device, name) == [g1, g1 + 3]
        assert read_export(device.uri(f"{name}@{g1}"))[:4096] == b"\x71" * 4096

        answer = cli_json(device, "backups", "unpin", name, str(g1))
        assert answer["gen"] == g1 and answer["pinned"] is False  # type: ignore[index]
        assert answer["lu"] == name  # type: ignore[index]
        assert [g["pinned"] for g in generations(device, name)] == [False, False]
        api_trigger(device, name)
        assert gen_numbers(device, name) == [g1 + 3, g1 + 4]  # now it is the oldest: gone
    finally:
        api_delete(device, name)


def test_pin_json_and_unpin_text(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=2)
    try:
        g1 = api_trigger(device, name, "keep")["gen"]
        answer = cli_json(device, "backups", "pin", name, str(g1))
        assert set(answer) >= LISTED  # type: ignore[arg-type]
        assert answer["gen"] == g1 and answer["pinned"] is True  # type: ignore[index]
        assert answer["label"] == "keep"  # type: ignore[index]
        assert generations(device, name)[0]["pinned"] is True
        assert flat(device.cli("backups", "unpin", name, str(g1)).stdout) == (
            f"unpinned {name}@{g1}")
        assert generations(device, name)[0]["pinned"] is False
    finally:
        api_delete(device, name)


def test_pin_and_unpin_of_an_unknown_generation(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=3)
    try:
        g1 = api_trigger(device, name)["gen"]
        api_trigger(device, name)
        api_trigger(device, name)  # recycles g1: it is unknown from now on
        before = generations(device, name)
        assert g1 not in [g["gen"] for g in before]
        for args in (("pin", name, "99"), ("unpin", name, "99"), ("pin", name, str(g1))):
            result = device.cli("backups", *args, check=False)
            assert_refused(result, f"LU '{name}' has no generation {args[2]}")
        assert generations(device, name) == before
    finally:
        api_delete(device, name)

