"""`mirrorpool status`: the device and its LUs, as a table and as JSON."""

from __future__ import annotations

import json
import time

from mirrorpool import __version__
from tests.cli.conftest import (
    api_create,
    api_delete,
    api_lu,
    assert_refused,
    flat,
    nbd_session,
    run,
    table_header,
    table_rows,
    wait_until,
)
from tests.helpers.processes import DeviceProcess

MIB = 1 << 20


def status_json(device: DeviceProcess) -> dict:
    result = device.cli("status", "--json")
    assert result.stderr == ""
    return json.loads(result.stdout)


def test_status_json(device: DeviceProcess) -> None:
    name = api_create(device, "3M", pool=2)
    try:
        with nbd_session(device.uri(name)):
            wait_until(lambda: api_lu(device, name)["connections"] == 1, what="connection")
            status = status_json(device)
        assert status["version"] == __version__
        assert status["pid"] == device.proc.pid  # type: ignore[union-attr]
        assert status["data_dir"] == str(device.data_dir)
        assert status["api"] == device.api
        assert f"nbd://127.0.0.1:{device.nbd_port}" in status["nbd"]
        assert f"nbd+unix:///?socket={device.unix_socket}" in status["nbd"]
        assert status["connections"] >= 1
        assert status["uptime_seconds"] > 0
        (mine,) = [lu for lu in status["lus"] if lu["name"] == name]
        assert (mine["size"], mine["pool"], mine["connections"]) == (3 * MIB, 2, 1)
        assert mine["uuid"] == api_lu(device, name)["uuid"]
        assert [lu["name"] for lu in status["lus"]] == sorted(lu["name"] for lu in status["lus"])
    finally:
        api_delete(device, name)
    later = status_json(device)
    assert name not in [lu["name"] for lu in later["lus"]]
    assert later["uptime_seconds"] >= status["uptime_seconds"]


def test_status_connections_go_back_down(device: DeviceProcess) -> None:
    name = api_create(device, "1M")
    try:
        with nbd_session(device.uri(name)), nbd_session(device.uri(name)):
            wait_until(lambda: api_lu(device, name)["connections"] == 2, what="2 connections")
            assert status_json(device)["connections"] >= 2
        wait_until(lambda: api_lu(device, name)["connections"] == 0, what="disconnects")
        (mine,) = [lu for lu in status_json(device)["lus"] if lu["name"] == name]
        assert mine["connections"] == 0
    finally:
        api_delete(device, name)


def test_status_table(device: DeviceProcess) -> None:
    name = api_create(device, "1536K", pool=0)
    try:
        with nbd_session(device.uri(name)):
            wait_until(lambda: api_lu(device, name)["connections"] == 1, what="connection")
            result = device.cli("status")
        assert result.returncode == 0 and result.stderr == ""
        out = result.stdout
        head = flat(out.split("┏")[0])
        assert head.startswith(f"mirrorpool {__version__} pid {device.proc.pid}")  # type: ignore
        assert f"data {device.data_dir}" in head
        assert f"NBD nbd://127.0.0.1:{device.nbd_port}" in head
        assert f"nbd+unix:///?socket={device.unix_socket}" in head
        assert f"API {device.api}" in head
        assert "connections " in head
        header = table_header(out)
        assert header[:3] == ["LU", "size", "pool"]
        rows = {cells[0]: dict(zip(header, cells, strict=True)) for cells in table_rows(out)}
        assert rows[name]["size"] == "1.5M"
        assert rows[name]["pool"] == "0"
        assert rows[name]["connections"] == "1"
    finally:
        api_delete(device, name)
    assert name not in device.cli("status").stdout


def test_status_on_an_empty_device(fresh_device: DeviceProcess) -> None:
    fresh_device.start()
    status = status_json(fresh_device)
    assert status["lus"] == [] and status["connections"] == 0
    out = fresh_device.cli("status").stdout
    assert table_header(out)[0] == "LU"
    assert table_rows(out) == []


def test_status_uptime_counts(device: DeviceProcess) -> None:
    first = status_json(device)["uptime_seconds"]
    time.sleep(0.2)
    assert status_json(device)["uptime_seconds"] >= first + 0.2


def test_status_of_a_dead_api_is_a_plain_error() -> None:
    assert_refused(run("status", "--api", "http://127.0.0.1:1"),
                   "cannot reach the device at http://127.0.0.1:1")
    assert_refused(run("status", "--json", api="http://127.0.0.1:1"), "cannot reach")
