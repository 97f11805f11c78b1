"""Failover and failback: promote the remote copy on B, write there, bring A back in line.

Also the identity rules of a link: a copy has one source, hosts cannot write to it,
and a link into an LU that is already another LU's copy is refused.
"""

from __future__ import annotations

import json
import time

import nbd

from tests.helpers.processes import DeviceProcess
from tests.mirror_support import (
    MiB,
    api,
    api_trigger,
    assert_identical,
    close,
    link_status,
    lu_path,
    qemu_io,
    remote_gens,
    run,
    wait_caught_up,
    wait_until,
)

SIZE = 8 * MiB


def _linked(a: DeviceProcess, b: DeviceProcess, name: str, pool: int = 2) -> None:
    api(a, "POST", "/v1/lus", {"name": name, "size": SIZE, "pool": pool}, expect=201)
    a.cli("remote", "add", name, "--device", b.api, "--remote-pool", str(pool))
    wait_caught_up(a, name)


def test_promote_write_on_the_copy_then_reverse_resync_copies_only_what_differs(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    a, b = pair
    _linked(a, b, "f")
    # nothing to bring back from a copy that was never promoted
    early = a.cli("remote", "resync", "f", "--reverse", check=False)
    assert early.returncode == 1 and "not promoted" in " ".join(early.stderr.split())
    assert link_status(a, "f")["state"] == "consistent"
    qemu_io(a.uri("f"), "write -P 0x11 0 4M")
    api_trigger(a, "f", "before-failover")
    wait_caught_up(a, "f")
    assert_identical(a.uri("f"), b.uri("f"))

    # disaster on A's side: B's copy becomes the primary, and hosts write there
    out = b.cli("remote", "promote", "f").stdout
    assert "is a primary now" in out
    qemu_io(b.uri("f"), "write -P 0x22 1M 64k", "write -P 0x23 6M 8k")
    # A, cut off from its hosts' view, still took a write of its own
    qemu_io(a.uri("f"), "write -P 0x33 2M 4k")
    wait_until(lambda: "promoted there" in link_status(a, "f")["last_error"], 20,
               "A to report the promoted copy")
    # B's copy refuses a second promote, and restores are for primaries: both clear
    again = b.cli("remote", "promote", "f", check=False)
    assert again.returncode == 1 and "primary already" in again.stderr

    out = a.cli("remote", "resync", "f", "--reverse", "--json").stdout
    result = json.loads(out)
    # 64 KiB + 8 KiB written on B, 4 KiB on A: 76 KiB differ out of 8 MiB
    assert result["bytes_copied"] == 76 * 1024, result
    assert_identical(a.uri("f"), b.uri("f"))
    qemu_io(a.uri("f"), "read -P 0x22 1M 64k", "read -P 0x11 2M 4k")

    # replicating from A again, into a copy hosts on B cannot write
    status = link_status(a, "f")
    assert status["state"] == "consistent", status
    refused = run(["qemu-io", "-f", "raw", "-c", "write 0 4k", b.uri("f")], check=False)
    assert refused.returncode != 0
    qemu_io(a.uri("f"), "write -P 0x44 3M 64k")
    api_trigger(a, "f", "after-failback")
    wait_caught_up(a, "f")
    assert_identical(a.uri("f"), b.uri("f"))
    labels = [g["label"] for g in remote_gens(a, "f") if g["remote_gen"] is not None]
    assert "after-failback" in labels


def test_promote_a_chosen_generation(pair: tuple[DeviceProcess, DeviceProcess]) -> None:
    a, b = pair
    _linked(a, b, "g", pool=3)
    qemu_io(a.uri("g"), "write -P 0x51 0 1M")
    first = api_trigger(a, "g", "one")
    qemu_io(a.uri("g"), "write -P 0x52 0 1M")
    api_trigger(a, "g", "two")
    wait_caught_up(a, "g")
    (row,) = [r for r in remote_gens(a, "g") if r["label"] == "one"]
    b.cli("remote", "promote", "g", "--gen", str(row["remote_gen"]))
    # B's primary now reads as A's generation for the first trigger
    assert_identical(a.uri(f"g@{first['gen']}"), b.uri("g"))
    qemu_io(b.uri("g"), "write -P 0x53 0 4k")


def test_a_copy_has_one_source_and_no_host_writers(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    a, b = pair
    _linked(a, b, "h")
    # another LU of A may not take over the copy of "h"
    api(a, "POST", "/v1/lus", {"name": "other", "size": SIZE, "pool": 1}, expect=201)
    result = a.cli("remote", "add", "other", "--device", b.api, "--remote-name", "h",
                   check=False)
    assert result.returncode == 1 and "already the copy of LU 'h'" in result.stderr
    assert api(a, "GET", "/v1/remotes") and len(api(a, "GET", "/v1/remotes")) == 1
    # a copy cannot be restored under its link, nor replicated onward
    gen = api_trigger(b, "h", "local")["gen"]
    status, body = b.request("POST", f"{lu_path('h')}/restore", {"gen": gen})
    assert status == 409 and "remote promote" in body["detail"]
    result = b.cli("remote", "add", "h", "--device", a.api, check=False)
    assert result.returncode == 1 and "is itself a remote copy" in result.stderr
    # B's own view of the copy
    copy = api(b, "GET", f"{lu_path('h')}/replica-of")
    assert copy["source_lu"] == "h"
    assert copy["source_device"] == api(a, "GET", "/v1/status")["device_id"]


def test_link_into_an_lu_with_writing_hosts_is_refused(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    a, b = pair
    api(a, "POST", "/v1/lus", {"name": "w", "size": SIZE, "pool": 1}, expect=201)
    api(b, "POST", "/v1/lus", {"name": "w", "size": SIZE, "pool": 1}, expect=201)
    h = nbd.NBD()
    h.connect_uri(b.uri("w"))
    try:
        result = a.cli("remote", "add", "w", "--device", b.api, check=False)
        assert result.returncode == 1 and "host connection" in result.stderr
    finally:
        close(h)
    # once the host is gone the link is taken, and an existing LU is compared, not copied
    qemu_io(a.uri("w"), "write -P 0x61 0 64k")
    a.cli("remote", "add", "w", "--device", b.api)
    status = wait_caught_up(a, "w")
    assert status["compared_bytes"] == SIZE
    assert status["sent_bytes"] <= 64 * 1024
    assert_identical(a.uri("w"), b.uri("w"))


def test_a_reverse_resync_refused_by_b_leaves_the_link_stopped_until_it_is_run_again(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    a, b = pair
    _linked(a, b, "k")
    b.cli("remote", "promote", "k")
    qemu_io(b.uri("k"), "write -P 0x81 0 64k")
    h = nbd.NBD()
    h.connect_uri(b.uri("k"))  # a host still on B's primary
    try:
        result = a.cli("remote", "resync", "k", "--reverse", check=False)
        assert result.returncode == 1 and "host connection" in " ".join(result.stderr.split())
    finally:
        close(h)
    status = link_status(a, "k")
    assert status["state"] == "reversing" and not status["connected"]
    assert "run `mirrorpool remote resync k --reverse` again" in status["last_error"]
    # across a restart of A too: the link must not refresh B from A's older data
    a.stop()
    a.start()
    time.sleep(1)
    assert link_status(a, "k")["state"] == "reversing"
    qemu_io(b.uri("k"), "read -P 0x81 0 64k")
    refused = a.cli("remote", "resync", "k", check=False)
    assert refused.returncode == 1 and "did not finish" in " ".join(refused.stderr.split())
    a.cli("remote", "resync", "k", "--reverse")
    assert_identical(a.uri("k"), b.uri("k"))
    qemu_io(a.uri("k"), "read -P 0x81 0 64k")
    assert link_status(a, "k")["state"] == "consistent"
