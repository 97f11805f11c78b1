"""`mirrorpool remote add|status|list|remove` and `backups NAME --remote`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.helpers.processes import DeviceProcess
from tests.mirror_support import api, assert_identical, qemu_io, wait_caught_up, wait_until


def test_add_status_list_remove(pair: tuple[DeviceProcess, DeviceProcess]) -> None:
    a, b = pair
    a.cli("lu", "create", "db", "--size", "4M", "--pool", "1")
    qemu_io(a.uri("db"), "write -P 0x5a 0 64k")
    out = a.cli("remote", "add", "db", "--device", b.api, "--remote-name", "db-copy",
                "--remote-pool", "2").stdout
    assert "db replicates to db-copy" in out
    wait_caught_up(a, "db")
    assert api(b, "GET", "/v1/lus/db-copy")["pool"] == 2  # type: ignore[index]
    status = json.loads(a.cli("remote", "status", "db", "--json").stdout)
    assert status["state"] == "consistent" and status["connected"]
    assert status["remote"] == "db-copy" and status["mode"] == "async"
    table = a.cli("remote", "status", "db").stdout
    assert "consistent" in table and "db-copy" in table
    metrics = httpx.get(a.api + "/metrics").text
    assert 'mirrorpool_replication_consistent{lu="db"} 1.0' in metrics
    assert 'mirrorpool_replication_lag_sequence{lu="db"} 0.0' in metrics
    for counter in ("records_sent", "windows_sent"):
        assert f'mirrorpool_replication_{counter}_total{{lu="db"}}' in metrics
    assert [s["lu"] for s in json.loads(a.cli("remote", "list", "--json").stdout)] == ["db"]

    made = json.loads(a.cli("trigger", "db", "--label", "cli", "--json").stdout)
    gen = made["generations"][0]
    assert gen["replicated"] is True
    wait_caught_up(a, "db")
    rows = json.loads(a.cli("backups", "db", "--remote", "--json").stdout)
    row = next(r for r in rows if r["trigger_id"] == made["trigger_id"])
    assert row["gen"] == gen["gen"] and row["remote_gen"] is not None
    after = json.loads(a.cli("remote", "status", "db", "--json").stdout)
    assert 1 <= after["windows_sent"] <= after["records_sent"]  # the TRIGGER, at least
    remote_table = b.cli("backups", "db-copy").stdout
    assert "origin seq" in remote_table and made["trigger_id"] in remote_table
    # B's side of the link: the copy, its source, what it applied, the last trigger
    copy = json.loads(b.cli("remote", "status", "db-copy", "--json").stdout)
    assert copy["role"] == "copy" and copy["source_lu"] == "db" and copy["connected"]
    assert copy["applied_bytes"] >= 64 * 1024
    assert copy["last_remote_trigger"]["trigger_id"] == made["trigger_id"]
    assert copy["last_remote_trigger"]["gen"] == row["remote_gen"]
    assert "copy of" in b.cli("remote", "status", "db-copy").stdout

    assert "no longer replicated" in a.cli("remote", "remove", "db").stdout
    assert json.loads(a.cli("remote", "list", "--json").stdout) == []
    result = a.cli("remote", "status", "db", check=False)
    assert result.returncode == 1 and "not replicated" in result.stderr
    # B keeps its copy and its generations
    assert api(b, "GET", "/v1/lus/db-copy/backups")


def test_refusals_are_one_sentence(pair: tuple[DeviceProcess, DeviceProcess]) -> None:
    a, b = pair
    a.cli("lu", "create", "m", "--size", "8M", "--pool", "1")
    b.cli("lu", "create", "m", "--size", "16M", "--pool", "1")
    for args, words in [
        (["--device", b.api], "sizes must match"),
        (["--device", "http://127.0.0.1:1"], "cannot reach the remote device"),
        (["--device", b.api, "--mode", "sometimes"], "mode must be one of"),
        (["--device", "b.example:10880"], "control API URL"),
        (["--device", b.api, "--journal-limit", "12Q"], "size"),
    ]:
        result = a.cli("remote", "add", "m", *args, check=False)
        assert result.returncode == 1, (args, result.stdout)
        assert words in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    result = a.cli("remote", "add", "nope", "--device", b.api, check=False)
    assert result.returncode == 1 and "no LU named" in result.stderr
    assert api(a, "GET", "/v1/remotes") == []
    # a replicated LU cannot be resized
    a.cli("lu", "create", "g", "--size", "4M", "--pool", "1")
    a.cli("remote", "add", "g", "--device", b.api)
    result = a.cli("lu", "resize", "g", "--size", "8M", check=False)
    assert result.returncode == 1 and "is replicated" in result.stderr


def test_resync_compares_and_copies_only_what_differs(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    a, b = pair
    a.cli("lu", "create", "v", "--size", "8M", "--pool", "1")
    qemu_io(a.uri("v"), "write -P 0x3c 0 2M")
    a.cli("remote", "add", "v", "--device", b.api)
    wait_caught_up(a, "v")
    # the copy's file goes bad behind the device's back (a disk's silent corruption)
    uuid = api(b, "GET", "/v1/lus/v")["uuid"]  # type: ignore[index]
    image = Path(b.data_dir) / "lu" / f"{uuid}.img"
    with open(image, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xee" * 4096)
    sent_before = api(a, "GET", "/v1/lus/v/remote")["sent_bytes"]  # type: ignore[index]
    out = a.cli("remote", "resync", "v").stdout
    assert "comparing" in out
    wait_until(lambda: api(a, "GET", "/v1/lus/v/remote")["compared_bytes"] == 8 << 20, 30,
               "the comparison")
    status = wait_caught_up(a, "v")
    assert status["sent_bytes"] - sent_before == 4096, status
    assert_identical(a.uri("v"), b.uri("v"))
    refused = a.cli("remote", "resync", "nope", check=False)
    assert refused.returncode == 1 and "no LU named" in refused.stderr
