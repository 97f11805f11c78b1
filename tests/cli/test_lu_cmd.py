"""`mirrorpool lu create|list|delete|resize` against a real device.

Setting up and checking go through the control API (quick); the CLI runs only for the
command under test.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbd
import pytest

from tests.cli.conftest import (
    RECORD_FIELDS,
    api_create,
    api_delete,
    api_lu,
    assert_refused,
    cli_json,
    flat,
    lu_names,
    nbd_session,
    nbd_size,
    pattern,
    record,
    run,
    table_header,
    table_rows,
    unique,
    wait_until,
)
from tests.helpers.processes import DeviceProcess

MIB = 1 << 20


# ---------------------------------------------------------------- create


@pytest.mark.parametrize(
    ("size", "expected"),
    [("1536K", 1536 * 1024), ("3M", 3 * MIB), ("1G", 1 << 30), ("1.5M", 3 * MIB // 2),
     ("2048", 2048), ("4k", 4096)],
)
def test_create_with_size_suffix(device: DeviceProcess, size: str, expected: int) -> None:
    name = unique()
    lu = cli_json(device, "lu", "create", name, "--size", size, "--pool", "0")
    try:
        assert lu["name"] == name and lu["size"] == expected  # type: ignore[index]
        assert api_lu(device, name)["size"] == expected
        assert nbd_size(device.uri(name)) == expected
    finally:
        api_delete(device, name)


def test_create_prints_a_summary(device: DeviceProcess) -> None:
    name = unique()
    out = device.cli("lu", "create", name, "--size", "2M", "--pool", "0").stdout
    api_delete(device, name)
    assert flat(out) == f"created LU {name} (2M, pool 0)"


@pytest.mark.parametrize(("args", "pool"), [(["--pool", "5"], 5), (["--pool", "0"], 0),
                                            ([], 3)])
def test_create_stores_the_pool(device: DeviceProcess, args: list[str], pool: int) -> None:
    name = unique()
    try:
        assert cli_json(device, "lu", "create", name, "--size", "1M", *args)["pool"] == pool
        assert api_lu(device, name)["pool"] == pool
    finally:
        api_delete(device, name)


@pytest.mark.parametrize("pool", ["-1", "65"])
def test_create_refuses_a_pool_out_of_range(device: DeviceProcess, pool: str) -> None:
    name = unique()
    result = device.cli("lu", "create", name, "--size", "1M", "--pool", pool, check=False)
    assert_refused(result, "pool")
    assert name not in lu_names(device)


def test_create_on_a_backing_file_takes_its_size_and_data(
    device: DeviceProcess, tmp_path: Path
) -> None:
    backing = tmp_path / "disk.img"
    content = pattern(2 * MIB)
    backing.write_bytes(content)
    name = unique()
    lu = cli_json(device, "lu", "create", name, "--backing", str(backing), "--pool", "0")
    try:
        assert lu["size"] == 2 * MIB  # type: ignore[index]
        assert lu["backing"] == str(backing)  # type: ignore[index]
        assert lu["data_path"] == str(backing)  # type: ignore[index]
        with nbd_session(device.uri(name)) as h:
            assert h.get_size() == 2 * MIB
            assert h.pread(4096, MIB) == content[MIB:MIB + 4096]
            h.pwrite(b"\xee" * 4096, 0)
            h.flush()
        with open(backing, "rb") as f:
            assert f.read(4096) == b"\xee" * 4096
    finally:
        api_delete(device, name)
    # deleting the LU leaves the user's backing file in place
    assert backing.read_bytes()[4096:] == content[4096:]


def test_create_on_a_backing_file_rounds_its_size_down_to_sectors(
    device: DeviceProcess, tmp_path: Path
) -> None:
    backing = tmp_path / "odd.img"
    backing.write_bytes(b"\x01" * (MIB + 700))
    name = unique()
    lu = cli_json(device, "lu", "create", name, "--backing", str(backing), "--pool", "0")
    api_delete(device, name)
    assert lu["size"] == MIB + 512  # type: ignore[index]
    assert os.path.getsize(backing) == MIB + 700  # the file is not cut


def test_create_on_a_backing_file_with_a_larger_size_grows_it(
    device: DeviceProcess, tmp_path: Path
) -> None:
    backing = tmp_path / "small.img"
    backing.write_bytes(b"\x07" * 4096)
    name = unique()
    lu = cli_json(device, "lu", "create", name, "--backing", str(backing), "--size", "1M",
                  "--pool", "0")
    try:
        assert lu["size"] == MIB  # type: ignore[index]
        with nbd_session(device.uri(name)) as h:
            assert h.get_size() == MIB
            assert h.pread(4096, 0) == b"\x07" * 4096
            assert h.pread(4096, MIB - 4096) == bytes(4096)
    finally:
        api_delete(device, name)


def test_create_refuses_a_relative_backing_path(
    device: DeviceProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rel.img").write_bytes(bytes(MIB))
    monkeypatch.chdir(tmp_path)  # the file exists relative to the CLI: still refused
    name = unique()
    result = device.cli("lu", "create", name, "--backing", "rel.img", "--pool", "0", check=False)
    assert_refused(result, "absolute path", "'rel.img'")
    assert name not in lu_names(device)


@pytest.mark.parametrize(
    ("backing", "phrase"),
    [("/nonexistent/disk.img", "No such file"), ("/dev/null", "neither a regular file"),
     ("/tmp", "neither a regular file")],
)
def test_create_refuses_an_unusable_backing(
    device: DeviceProcess, backing: str, phrase: str
) -> None:
    name = unique()
    result = device.cli("lu", "create", name, "--backing", backing, "--pool", "0", check=False)
    assert_refused(result, phrase)
    assert name not in lu_names(device)


def test_create_refuses_an_empty_backing_file_without_size(
    device: DeviceProcess, tmp_path: Path
) -> None:
    backing = tmp_path / "empty.img"
    backing.touch()
    name = unique()
    result = device.cli("lu", "create", name, "--backing", str(backing), check=False)
    assert_refused(result, "is empty", "--size")
    assert name not in lu_names(device)


def test_create_refuses_a_backing_file_used_by_another_lu(
    device: DeviceProcess, tmp_path: Path
) -> None:
    backing = tmp_path / "shared.img"
    backing.write_bytes(bytes(MIB))
    first, second = unique(), unique()
    api_create(device, None, name=first, backing=str(backing))  # type: ignore[arg-type]
    try:
        result = device.cli("lu", "create", second, "--backing", str(backing), check=False)
        assert_refused(result, "already backs another LU")
        assert second not in lu_names(device)
    finally:
        api_delete(device, first)


def test_create_refuses_a_duplicate_and_changes_nothing(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=1)
    try:
        before = record(api_lu(device, name))
        with nbd_session(device.uri(name)) as h:
            h.pwrite(b"\x5a" * 4096, 0)
            h.flush()
        result = device.cli("lu", "create", name, "--size", "4M", "--pool", "0", check=False)
        assert result.returncode != 0
        assert_refused(result, "already exists", name)
        assert record(api_lu(device, name)) == before
        assert lu_names(device).count(name) == 1
        with nbd_session(device.uri(name)) as h:
            assert h.get_size() == MIB
            assert h.pread(4096, 0) == b"\x5a" * 4096
    finally:
        api_delete(device, name)


@pytest.mark.parametrize("bad", ["a@b", "x:y", "", "a/b", "a b", "_lead", "x" * 65])
def test_create_refuses_invalid_names(device: DeviceProcess, bad: str) -> None:
    before = lu_names(device)
    result = device.cli("lu", "create", bad, "--size", "1M", "--pool", "0", check=False)
    assert_refused(result, "is not a valid LU name")
    assert lu_names(device) == before


def test_create_accepts_names_at_the_limits(device: DeviceProcess) -> None:
    longest = ("9" + unique("x") + "._-" + "z" * 64)[:64]
    device.cli("lu", "create", longest, "--size", "512", "--pool", "0")
    try:
        assert nbd_size(device.uri(longest)) == 512
    finally:
        api_delete(device, longest)


@pytest.mark.parametrize(
    ("size", "phrase"),
    [("12Q", "is not a size"), ("0", "positive multiple of 512"),
     ("1000", "multiple of 512"), ("-1M", "is not a size"), ("1.5", "whole number"),
     ("abc", "is not a size")],
)
def test_create_refuses_bad_sizes(device: DeviceProcess, size: str, phrase: str) -> None:
    name = unique()
    result = device.cli("lu", "create", name, "--size", size, "--pool", "0", check=False)
    assert_refused(result, phrase)
    assert name not in lu_names(device)


def test_create_needs_a_size_without_backing(device: DeviceProcess) -> None:
    name = unique()
    assert_refused(device.cli("lu", "create", name, check=False), "a size is needed")
    assert name not in lu_names(device)


# ---------------------------------------------------------------- list


def test_list_table(device: DeviceProcess) -> None:
    small = api_create(device, "1536K", pool=2, name=unique("a"))
    big = api_create(device, "3G", pool=0, name=unique("b"))
    try:
        out = device.cli("lu", "list").stdout
        assert table_header(out) == ["name", "size", "pool", "connections", "uuid", "created"]
        rows = {cells[0]: cells for cells in table_rows(out)}
        assert rows[small][:5] == [small, "1.5M", "2", "0", api_lu(device, small)["uuid"]]
        assert rows[big][:5] == [big, "3G", "0", "0", api_lu(device, big)["uuid"]]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows[small][5])
    finally:
        api_delete(device, small)
        api_delete(device, big)
    assert small not in device.cli("lu", "list").stdout


def test_list_json(device: DeviceProcess) -> None:
    name = api_create(device, "2M", pool=4)
    try:
        lus = json.loads(device.cli("lu", "list", "--json").stdout)
        assert isinstance(lus, list)
        assert [lu["name"] for lu in lus] == sorted(lu["name"] for lu in lus)
        (mine,) = [lu for lu in lus if lu["name"] == name]
        assert set(RECORD_FIELDS) | {"connections"} <= set(mine)
        assert mine["size"] == 2 * MIB and mine["pool"] == 4 and mine["backing"] is None
        assert mine["connections"] == 0
        assert mine["data_path"].startswith(str(device.data_dir))
        assert os.path.getsize(mine["data_path"]) == 2 * MIB
        with nbd_session(device.uri(name)):
            wait_until(lambda: api_lu(device, name)["connections"] == 1, what="connection")
            again = {lu["name"]: lu for lu in cli_json(device, "lu", "list")}
            assert again[name]["connections"] == 1
    finally:
        api_delete(device, name)


# ---------------------------------------------------------------- resize


def test_resize_grows_and_new_connections_see_it(device: DeviceProcess) -> None:
    name = api_create(device, "1M")
    try:
        with nbd_session(device.uri(name)) as h:
            h.pwrite(pattern(4096), MIB - 4096)
            h.flush()
        out = device.cli("lu", "resize", name, "--size", "3M").stdout
        assert flat(out) == f"LU {name} is now 3M"
        assert api_lu(device, name)["size"] == 3 * MIB
        assert nbd_size(device.uri(name)) == 3 * MIB
        with nbd_session(device.uri(name)) as h:
            assert h.get_size() == 3 * MIB
            assert h.pread(4096, MIB - 4096) == pattern(4096)  # old data kept
            assert h.pread(4096, MIB) == bytes(4096)  # the new part reads zeros
            h.pwrite(b"\x33" * 4096, 3 * MIB - 4096)
            assert h.pread(4096, 3 * MIB - 4096) == b"\x33" * 4096
        assert cli_json(device, "lu", "resize", name, "--size", "4M")["size"] == 4 * MIB
    finally:
        api_delete(device, name)


def test_resize_of_a_mirrored_lu(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=2)
    try:
        device.cli("lu", "resize", name, "--size", "2M")
        assert nbd_size(device.uri(name)) == 2 * MIB
        with nbd_session(device.uri(name)) as h:
            h.pwrite(b"\x44" * 4096, 2 * MIB - 4096)
            assert h.pread(4096, 2 * MIB - 4096) == b"\x44" * 4096
    finally:
        api_delete(device, name)


def test_resize_to_the_same_size_is_allowed(device: DeviceProcess) -> None:
    name = api_create(device, "1M")
    try:
        device.cli("lu", "resize", name, "--size", "1M")
        assert api_lu(device, name)["size"] == MIB
    finally:
        api_delete(device, name)


def test_resize_refuses_to_shrink(device: DeviceProcess) -> None:
    name = api_create(device, "2M")
    try:
        result = device.cli("lu", "resize", name, "--size", "1M", check=False)
        assert_refused(result, "would lose data", "only growing is supported")
        assert api_lu(device, name)["size"] == 2 * MIB
        assert nbd_size(device.uri(name)) == 2 * MIB
    finally:
        api_delete(device, name)


@pytest.mark.parametrize(("size", "phrase"), [("3000000", "multiple of 512"),
                                               ("12Q", "is not a size")])
def test_resize_refuses_bad_sizes(device: DeviceProcess, size: str, phrase: str) -> None:
    name = api_create(device, "1M")
    try:
        assert_refused(device.cli("lu", "resize", name, "--size", size, check=False), phrase)
        assert api_lu(device, name)["size"] == MIB
    finally:
        api_delete(device, name)


def test_resize_of_an_unknown_lu(device: DeviceProcess) -> None:
    name = unique("missing")
    result = device.cli("lu", "resize", name, "--size", "2M", check=False)
    assert_refused(result, f"no LU named '{name}'")


# ---------------------------------------------------------------- delete


def test_delete(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=1)
    data_path = api_lu(device, name)["data_path"]
    assert os.path.exists(data_path)
    before = set(os.listdir(os.path.dirname(data_path)))
    assert flat(device.cli("lu", "delete", name).stdout) == f"deleted LU {name}"
    assert name not in lu_names(device)
    assert not os.path.exists(data_path)
    uuid = os.path.basename(data_path).split(".")[0]
    # the LU's own files (data and backup members) are gone, nobody else's
    left = set(os.listdir(os.path.dirname(data_path)))
    assert {f for f in before - left if not f.startswith(uuid)} == set()
    assert not [f for f in left if f.startswith(uuid)]
    status, _ = device.request("GET", f"/v1/lus/{name}")
    assert status == 404
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(device.uri(name))


def test_delete_json(device: DeviceProcess) -> None:
    name = api_create(device, "1M")
    assert cli_json(device, "lu", "delete", name) == {"deleted": name}
    assert name not in lu_names(device)


def test_recreated_lu_does_not_see_old_data(device: DeviceProcess) -> None:
    name = api_create(device, "1M")
    first = api_lu(device, name)
    with nbd_session(device.uri(name)) as h:
        h.pwrite(b"\x99" * 4096, 0)
        h.flush()
    device.cli("lu", "delete", name)
    api_create(device, "1M", name=name)
    try:
        assert api_lu(device, name)["uuid"] != first["uuid"]
        with nbd_session(device.uri(name)) as h:
            assert h.pread(4096, 0) == bytes(4096)
    finally:
        api_delete(device, name)


def test_delete_refused_while_connected_then_forced(device: DeviceProcess) -> None:
    name = api_create(device, "1M")
    data_path = api_lu(device, name)["data_path"]
    h = nbd.NBD()
    h.connect_uri(device.uri(name))
    try:
        h.pwrite(b"\x11" * 512, 0)
        wait_until(lambda: api_lu(device, name)["connections"] == 1, what="connection counted")

        result = device.cli("lu", "delete", name, check=False)
        assert_refused(result, "1 connected client(s)", "--force")
        assert name in lu_names(device)
        assert os.path.exists(data_path)
        assert h.pread(512, 0) == b"\x11" * 512  # the client is still served

        out = device.cli("lu", "delete", name, "--force").stdout
        assert flat(out) == f"deleted LU {name}"
        assert name not in lu_names(device)
        assert not os.path.exists(data_path)
        with pytest.raises(nbd.Error):
            h.pread(512, 0)
    finally:
        api_delete(device, name)
        del h


def test_delete_of_an_unknown_lu(device: DeviceProcess) -> None:
    name = unique("missing")
    assert_refused(device.cli("lu", "delete", name, check=False), f"no LU named '{name}'")
    assert_refused(device.cli("lu", "delete", name, "--force", check=False), "no LU named")


# ---------------------------------------------------------------- reaching the device


@pytest.mark.parametrize(
    "args",
    [("lu", "list"), ("lu", "create", "x", "--size", "1M"), ("lu", "delete", "x"),
     ("lu", "resize", "x", "--size", "2M"), ("lu", "list", "--json")],
)
def test_dead_api_is_a_plain_error(args: tuple[str, ...]) -> None:
    result = run(*args, "--api", "http://127.0.0.1:1")
    assert_refused(result, "cannot reach the device at http://127.0.0.1:1",
                   "is `mirrorpool serve` running?")


def test_dead_api_from_the_environment() -> None:
    assert_refused(run("lu", "list", api="http://127.0.0.1:1"),
                   "cannot reach the device at http://127.0.0.1:1")


def test_api_option_wins_over_the_environment(device: DeviceProcess) -> None:
    name = api_create(device, "1M")
    try:
        result = run("lu", "list", "--json", "--api", device.api, api="http://127.0.0.1:1")
        assert result.returncode == 0, result.stderr
        assert name in [lu["name"] for lu in json.loads(result.stdout)]
    finally:
        api_delete(device, name)


def test_api_that_is_not_a_device_is_a_plain_error(device: DeviceProcess) -> None:
    # something answers, but not the control API: its 404 becomes a sentence
    assert_refused(run("lu", "list", "--api", device.api + "/nothing-here"), "Not Found")
