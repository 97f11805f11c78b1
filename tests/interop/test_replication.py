"""Replication of an LU to a second device: same cut on both sides (invariant 6).

Two real device processes on loopback.  Device A replicates LU ``r`` to device B
over NBD with the in-band TRIGGER extension; qemu-io writes on A, triggers come
through A's API, and every generation B made for a trigger must equal A's
generation for that trigger byte for byte (qemu-img compare).
"""

from __future__ import annotations

import signal
import time

import nbd

from mirrorpool.nbd.client import NbdClient
from mirrorpool.nbd.codec import REQUEST_HEADER
from mirrorpool.nbd.constants import REQUEST_MAGIC, Cmd
from tests.helpers.processes import DeviceProcess
from tests.mirror_support import (
    MiB,
    api,
    api_trigger,
    assert_identical,
    assert_same_cut,
    link_status,
    lu_path,
    qemu_io,
    remote_gens,
    run,
    wait_caught_up,
    wait_until,
)

SIZE = 8 * MiB


def add_link(a: DeviceProcess, b: DeviceProcess, name: str, *extra: str) -> None:
    a.cli("remote", "add", name, "--device", b.api, "--remote-pool", "2", *extra)


def link_then_kill_b(a: DeviceProcess, b: DeviceProcess, name: str, pool: int,
                     *extra: str) -> None:
    """A new LU on A, replicated to B and caught up; then B is SIGKILLed."""
    api(a, "POST", "/v1/lus", {"name": name, "size": SIZE, "pool": pool}, expect=201)
    add_link(a, b, name, *extra)
    wait_caught_up(a, name)
    b.stop(signal.SIGKILL)


def test_async_link_splits_the_remote_pool_at_the_same_points(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    a, b = pair
    api(a, "POST", "/v1/lus", {"name": "r", "size": SIZE, "pool": 2}, expect=201)
    qemu_io(a.uri("r"), "write -P 0x11 0 1M", "write -P 0x12 4M 64k")
    add_link(a, b, "r")  # B's LU is created, then copied in full
    wait_caught_up(a, "r")
    assert_identical(a.uri("r"), b.uri("r"))

    answers = []
    for i in range(4):
        qemu_io(a.uri("r"), f"write -P {0x20 + i} {i * 512}k 192k",
                f"write -z {6 * MiB + i * 4096} 4k")
        answers.append(api_trigger(a, "r", f"t{i}"))
        assert answers[-1]["replicated"] is True
    qemu_io(a.uri("r"), "write -P 0x77 0 4k")  # after the last trigger: in no generation
    wait_caught_up(a, "r")
    rows = {r["trigger_id"]: r for r in remote_gens(a, "r")}
    # a pool of 2 keeps one generation on each side: the newest, made by the last trigger
    row = rows[answers[-1]["trigger_id"]]
    assert row["gen"] == answers[-1]["gen"] and row["remote_gen"] is not None, rows
    # B records A's trigger id and sequence number with its generation
    b_gens = {g["trigger_id"]: g for g in api(b, "GET", f"{lu_path('r')}/backups")}
    for answer in answers:
        theirs = b_gens.get(answer["trigger_id"])
        if theirs is not None:  # still in B's pool (pool 2 keeps the newest)
            assert theirs["origin_seq"] == answer["seq"]
            assert theirs["source"] == "link"
    assert assert_same_cut(a, b, "r") >= 1
    assert_identical(a.uri("r"), b.uri("r"))
    out = a.cli("backups", "r", "--remote").stdout
    assert answers[-1]["trigger_id"] in out


def test_sync_link_has_each_write_on_the_remote_device_when_acknowledged(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    a, b = pair
    api(a, "POST", "/v1/lus", {"name": "s", "size": SIZE, "pool": 1}, expect=201)
    add_link(a, b, "s", "--mode", "sync")
    wait_caught_up(a, "s")
    for i in range(5):
        qemu_io(a.uri("s"), f"write -P {0x40 + i} {i * MiB} 64k")
        # acknowledged to qemu-io: already on B, with no wait
        qemu_io(b.uri("s"), f"read -P {0x40 + i} {i * MiB} 64k", read_only=True)
    status = link_status(a, "s")
    assert status["mode"] == "sync" and not status["degraded"]
    # the copy takes writes from its link only: hosts on B get it read-only
    refused = run(["qemu-io", "-f", "raw", "-c", "write 0 4k", b.uri("s")], check=False)
    assert refused.returncode != 0 and b"ermission denied" in refused.stdout + refused.stderr


def test_link_resumes_after_the_remote_device_restarts(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    a, b = pair
    link_then_kill_b(a, b, "c", 2)
    # B is gone: A goes on journaling, hosts never wait
    qemu_io(a.uri("c"), "write -P 0x51 0 256k", "write -P 0x52 2M 256k")
    first = api_trigger(a, "c", "while-b-down")
    qemu_io(a.uri("c"), "write -P 0x53 1M 128k")
    status = link_status(a, "c")
    assert not status["connected"]
    assert status["lag_seq"] > 0 and status["journal_used"] > 0
    # while B is away and hosts write, A backs off between attempts (0.1 s doubling
    # to 2 s) instead of retrying at every write
    before = a.log_text().count("replication link down")
    deadline = time.monotonic() + 3
    n = 0
    while time.monotonic() < deadline:
        qemu_io(a.uri("c"), f"write -P 0x54 {(n % 64) * 4096} 4k")
        n += 1
    assert a.log_text().count("replication link down") - before <= 6
    b.start()
    wait_caught_up(a, "c")
    rows = {r["trigger_id"]: r for r in remote_gens(a, "c")}
    assert rows[first["trigger_id"]]["remote_gen"] is not None
    assert assert_same_cut(a, b, "c") >= 1
    assert_identical(a.uri("c"), b.uri("c"))


def test_full_journal_falls_back_to_refreshing_and_becomes_consistent_again(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    a, b = pair
    link_then_kill_b(a, b, "f", 1, "--journal-limit", "1M")
    qemu_io(a.uri("f"), "write -P 0x61 0 2M")  # more than the journal holds
    status = link_status(a, "f")
    assert status["state"] == "inconsistent"
    answer = api_trigger(a, "f", "not-replicated")
    assert answer["replicated"] is False
    b.start()
    wait_caught_up(a, "f")
    assert_identical(a.uri("f"), b.uri("f"))
    assert link_status(a, "f")["triggers_not_replicated"] == 1


def test_a_link_to_an_lu_of_another_size_is_refused(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    a, b = pair
    api(a, "POST", "/v1/lus", {"name": "m", "size": SIZE, "pool": 1}, expect=201)
    api(b, "POST", "/v1/lus", {"name": "m", "size": 2 * SIZE, "pool": 1}, expect=201)
    result = a.cli("remote", "add", "m", "--device", b.api, check=False)
    assert result.returncode == 1
    assert "sizes must match" in result.stderr
    result = a.cli("remote", "add", "m", "--device", "http://127.0.0.1:1", check=False)
    assert result.returncode == 1 and "cannot reach the remote device" in result.stderr
    result = a.cli("remote", "add", "m", "--device", b.api, "--mode", "sometimes",
                   check=False)
    assert result.returncode == 1 and "mode must be one of" in result.stderr
    assert api(a, "GET", "/v1/remotes") == []


def test_a_clean_restart_after_giving_up_still_copies_what_the_journal_held(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    """The writes journalled before the link gave up reach B after A restarts cleanly."""
    a, b = pair
    link_then_kill_b(a, b, "j", 1, "--give-up-after", "1")
    qemu_io(a.uri("j"), "write -P 0x61 0 512k")  # journalled: B is away
    wait_until(lambda: link_status(a, "j")["state"] == "inconsistent", 30,
               "the link to give up")
    qemu_io(a.uri("j"), "write -P 0x62 4M 64k")  # after giving up: a dirty chunk
    a.stop()  # clean
    a.start()
    b.start()
    wait_caught_up(a, "j", 60)
    assert_identical(a.uri("j"), b.uri("j"))


def test_an_async_link_sends_a_trickle_of_writes_in_windows(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    """A link that is caught up lets records gather: one window per write would cost the
    host path nearly as much as a full window does."""
    a, b = pair
    api(a, "POST", "/v1/lus", {"name": "w", "size": SIZE, "pool": 1}, expect=201)
    add_link(a, b, "w")
    wait_caught_up(a, "w")
    before = link_status(a, "w")
    h = nbd.NBD()
    h.connect_uri(a.uri("w"))
    for i in range(400):  # one at a time: each answered before the next is sent
        h.pwrite(bytes([i % 251 + 1]) * 4096, (i * 7 % (SIZE // 4096)) * 4096)
    h.shutdown()
    wait_caught_up(a, "w")
    after = link_status(a, "w")
    records = after["records_sent"] - before["records_sent"]
    windows = after["windows_sent"] - before["windows_sent"]
    assert records >= 400  # records sent again after a reconnection count again
    # about 2 records a window without the wait, 20 or more with it
    assert windows * 4 <= records, (records, windows)
    assert_identical(a.uri("w"), b.uri("w"))


def _pipelined_writes(client: NbdClient, count: int, seed: int) -> tuple[list[bytes], bytes]:
    """``count`` 4 KiB writes to blocks 0.. as one send, and what the LU then holds there."""
    buffers: list[bytes | memoryview] = []
    blocks = [bytes([seed + i]) * 4096 for i in range(count)]
    for i, block in enumerate(blocks):
        buffers += client.encode_request(Cmd.WRITE, i * 4096, 4096, 0, block)[1]
    return [bytes(b) for b in buffers], b"".join(blocks)


def test_a_burst_of_host_writes_is_journalled_together(
    pair: tuple[DeviceProcess, DeviceProcess],
) -> None:
    """Writes a connection has already received are admitted before the first is carried
    out, so their journal records reach the file in a few system calls, not one each;
    writes followed at once by a disconnection are still carried out."""
    a, b = pair
    api(a, "POST", "/v1/lus", {"name": "g", "size": SIZE, "pool": 1}, expect=201)
    add_link(a, b, "g")
    wait_caught_up(a, "g")
    before = link_status(a, "g")["journal_writes"]
    client = NbdClient(a.uri("g"))
    buffers, expected = _pipelined_writes(client, 32, 1)
    client.send_buffers(buffers)
    replies = [client.next_reply() for _ in range(32)]
    assert all(error == 0 for _, error, _, _ in replies), replies
    writes = link_status(a, "g")["journal_writes"] - before
    assert 1 <= writes <= 16, writes  # 32 without the look-ahead

    # the same, with the disconnection right behind them and no reply read
    buffers, expected = _pipelined_writes(client, 16, 101)
    disc = REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0)
    client.sock.sendall(b"".join(buffers) + disc)
    client.abort()

    def landed() -> bool:  # the old connection's thread carries them out after it saw DISC
        with NbdClient(a.uri("g")) as again:
            return again.pread(len(expected), 0) == expected

    wait_until(landed, what="the writes sent before the disconnection")
    wait_caught_up(a, "g")
    assert_identical(a.uri("g"), b.uri("g"))
