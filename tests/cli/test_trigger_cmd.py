"""`mirrorpool trigger NAME [NAME...] [--label L] [--in-band] [--json]` against a real device.

Setting up and checking go through the control API and real NBD clients; the CLI runs
only for the command under test.
"""

from __future__ import annotations

import re
import time

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
    generations,
    mirror,
    pin,
    read_export,
    wait_no_readers,
)

GEN_FIELDS = {"lu", "gen", "seq", "label", "source", "trigger_id", "created"}


def write(device: DeviceProcess, name: str, data: bytes, offset: int) -> None:
    with nbd_session(device.uri(name)) as h:
        h.pwrite(data, offset)


def snapshot(device: DeviceProcess, name: str) -> tuple[list[dict], int | None, int]:
    """What a refused trigger must leave as it was: generations, active member, last seq."""
    m = mirror(device, name)
    return generations(device, name), m["active_member"], m["last_seq"]


def test_trigger_json(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=3)
    try:
        write(device, name, b"\x11" * 4096, 0)
        before = time.time()
        answer = cli_json(device, "trigger", name, "--label", "nightly run")
        (gen,) = answer["generations"]  # type: ignore[index]
        assert set(gen) >= GEN_FIELDS
        assert gen["lu"] == name and gen["gen"] == 1
        assert gen["label"] == "nightly run" and gen["source"] == "cli"
        assert gen["trigger_id"] == answer["trigger_id"]  # type: ignore[index]
        assert re.fullmatch(r"[0-9a-f]{16}", gen["trigger_id"])
        assert gen["seq"] == 2  # after the one write
        assert before - 1 <= gen["created"] <= time.time() + 1
        # the generation is there, listed with the same facts, and holds the write
        (listed,) = generations(device, name)
        assert {k: listed[k] for k in GEN_FIELDS} == {k: gen[k] for k in GEN_FIELDS}
        write(device, name, b"\x22" * 4096, 0)
        assert read_export(device.uri(f"{name}@1"))[:8192] == b"\x11" * 4096 + bytes(4096)
        assert mirror(device, name)["last_trigger"]["gen"] == 1
        # the next one numbers on
        again = cli_json(device, "trigger", name)["generations"][0]  # type: ignore[index]
        assert again["gen"] == 2 and again["label"] == "" and again["seq"] == 4
        assert again["trigger_id"] != gen["trigger_id"]
    finally:
        api_delete(device, name)


def test_trigger_prints_a_table(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=2)
    try:
        out = device.cli("trigger", name, "--label", "before-upgrade").stdout
        tid = generations(device, name)[0]["trigger_id"]
        assert flat(out.split("\n")[0]) == f"trigger {tid}"
        assert table_header(out) == ["LU", "gen", "seq", "label", "source", "created",
                                     "split ms"]
        (row,) = table_rows(out)
        assert row[:5] == [name, "1", "1", "before-upgrade", "cli"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row[5])
        assert float(row[6]) >= 0
    finally:
        api_delete(device, name)


def test_trigger_of_a_group_is_one_cut(device: DeviceProcess) -> None:
    first, second = api_create(device, "1M", pool=2), api_create(device, "1M", pool=2)
    try:
        write(device, first, b"\x31" * 4096, 0)
        write(device, second, b"\x32" * 4096, 4096)
        answer = cli_json(device, "trigger", second, first, "--label", "group")
        gens = answer["generations"]  # type: ignore[index]
        assert sorted(g["lu"] for g in gens) == sorted([first, second])
        assert {g["trigger_id"] for g in gens} == {answer["trigger_id"]}  # type: ignore[index]
        assert all(g["label"] == "group" and g["source"] == "cli" and g["gen"] == 1
                   for g in gens)
        assert read_export(device.uri(f"{first}@1"))[:4096] == b"\x31" * 4096
        assert read_export(device.uri(f"{second}@1"))[4096:8192] == b"\x32" * 4096
        for name in (first, second):
            assert [g["trigger_id"] for g in generations(device, name)] == [
                answer["trigger_id"]]  # type: ignore[index]
    finally:
        api_delete(device, first)
        api_delete(device, second)


def test_trigger_in_band(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=3)
    try:
        write(device, name, b"\x41" * 4096, 0)
        base = f"nbd://127.0.0.1:{device.nbd_port}"
        answer = cli_json(device, "trigger", name, "--in-band", "--nbd", base, "--label", "ib")
        (gen,) = answer["generations"]  # type: ignore[index]
        assert set(gen) >= GEN_FIELDS
        assert (gen["lu"], gen["gen"], gen["label"], gen["source"]) == (name, 1, "ib", "in-band")
        assert read_export(device.uri(f"{name}@1"))[:4096] == b"\x41" * 4096
        # without --nbd the NBD address comes from the device's status
        again = cli_json(device, "trigger", name, "--in-band")["generations"][0]  # type: ignore
        assert again["gen"] == 2 and again["source"] == "in-band"
        assert [g["source"] for g in generations(device, name)] == ["in-band", "in-band"]
    finally:
        api_delete(device, name)


def test_trigger_in_band_names_exactly_one_lu(device: DeviceProcess) -> None:
    first, second = api_create(device, "1M", pool=2), api_create(device, "1M", pool=2)
    try:
        result = device.cli("trigger", first, second, "--in-band", check=False)
        assert_refused(result, "--in-band triggers one LU")
        assert generations(device, first) == [] and generations(device, second) == []
    finally:
        api_delete(device, first)
        api_delete(device, second)


def test_trigger_of_an_unknown_lu(device: DeviceProcess) -> None:
    missing = unique("missing")
    assert_refused(device.cli("trigger", missing, check=False), f"no LU named '{missing}'")
    assert_refused(device.cli("trigger", missing, "--in-band", check=False), missing)


def test_group_trigger_with_an_unknown_lu_splits_nothing(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=2)
    missing = unique("missing")
    try:
        before = snapshot(device, name)
        result = device.cli("trigger", name, missing, check=False)
        assert_refused(result, f"no LU named '{missing}'")
        assert snapshot(device, name) == before
        assert before[0] == []
    finally:
        api_delete(device, name)


def test_trigger_of_an_lu_without_a_pool(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=0)
    mirrored = api_create(device, "1M", pool=2)
    try:
        write(device, name, b"\x51" * 512, 0)
        before = snapshot(device, name)
        result = device.cli("trigger", name, check=False)
        assert_refused(result, f"LU '{name}' has no backup pool (pool 0)")
        assert snapshot(device, name) == before
        assert generations(device, name) == []
        # in a group, one LU without a pool refuses the whole cut: the other is not split
        other_before = snapshot(device, mirrored)
        result = device.cli("trigger", mirrored, name, check=False)
        assert_refused(result, "has no backup pool (pool 0)")
        assert snapshot(device, mirrored) == other_before
        assert snapshot(device, name) == before
    finally:
        api_delete(device, name)
        api_delete(device, mirrored)


def test_trigger_refused_when_every_other_member_is_pinned(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=3)  # active + 2 generations
    try:
        write(device, name, b"\x61" * 4096, 0)
        g1 = api_trigger(device, name)["gen"]
        write(device, name, b"\x62" * 4096, 0)
        g2 = api_trigger(device, name)["gen"]
        pin(device, name, g1)
        pin(device, name, g2)
        write(device, name, b"\x63" * 4096, 0)
        before = snapshot(device, name)
        result = device.cli("trigger", name, "--label", "refused", check=False)
        assert_refused(result, "no pool member can take over as active backup",
                       f"generation {g1} is pinned", f"generation {g2} is pinned",
                       "unpin a generation")
        assert snapshot(device, name) == before
        assert read_export(device.uri(f"{name}@{g1}"))[:4096] == b"\x61" * 4096
        assert read_export(device.uri(f"{name}@{g2}"))[:4096] == b"\x62" * 4096
    finally:
        api_delete(device, name)


def test_trigger_refused_while_the_other_member_is_exported(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=2)  # active + 1 generation
    try:
        g1 = api_trigger(device, name)["gen"]
        with nbd_session(device.uri(f"{name}@{g1}")) as reader:
            assert [g["readers"] for g in generations(device, name)] == [1]
            before = snapshot(device, name)
            result = device.cli("trigger", name, check=False)
            assert_refused(result, f"generation {g1} is being read through an export",
                           "close its export")
            assert snapshot(device, name) == before
            reader.pread(512, 0)  # the reader is still served
        wait_no_readers(device, name)
        # once the export is closed, the same trigger recycles that generation
        gen = cli_json(device, "trigger", name)["generations"][0]  # type: ignore[index]
        assert gen["gen"] == g1 + 1
        assert [g["gen"] for g in generations(device, name)] == [g1 + 1]
    finally:
        api_delete(device, name)


def test_trigger_refusal_names_pinned_and_exported_members(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=3)
    try:
        g1 = api_trigger(device, name)["gen"]
        g2 = api_trigger(device, name)["gen"]
        pin(device, name, g1)
        with nbd_session(device.uri(f"{name}@{g2}")):
            before = snapshot(device, name)
            result = device.cli("trigger", name, "--json", check=False)
            assert_refused(result, f"generation {g1} is pinned",
                           f"generation {g2} is being read through an export")
            assert snapshot(device, name) == before
    finally:
        api_delete(device, name)


def test_trigger_refuses_a_label_with_control_characters(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=2)
    try:
        result = device.cli("trigger", name, "--label", "two\nlines", check=False)
        assert_refused(result, "label must not contain control characters")
        assert generations(device, name) == []
    finally:
        api_delete(device, name)


def test_in_band_trigger_refusal_says_why(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=2)
    try:
        g1 = api_trigger(device, name)["gen"]
        pin(device, name, g1)
        before = snapshot(device, name)
        result = device.cli("trigger", name, "--in-band", check=False)
        assert snapshot(device, name) == before
        assert_refused(result, f"generation {g1} is pinned")
    finally:
        api_delete(device, name)
