"""Prefix consistency of a split, seen by real clients, for each of the four triggers.

qemu-io writes known patterns, a trigger splits the mirror, qemu-io writes more.  The
generation must equal a reference file holding exactly the writes before the trigger,
and the primary a reference holding all of them (both compared with `qemu-img compare`).
The references are made by running the same qemu-io commands on a local raw file.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest

from mirrorpool.nbd.client import NbdClient
from tests.conftest import need
from tests.helpers.processes import DeviceProcess
from tests.interop import rawnbd
from tests.interop.support import HOLE, ZERO, check_coverage, nbdinfo_map
from tests.mirror_support import (
    CHUNK,
    TRIGGER_CMD,
    MiB,
    api,
    api_trigger,
    assert_identical,
    assert_reads_as,
    changed_runs,
    chunk_ranges,
    close,
    connect,
    flagged,
    generations,
    identical,
    make_reference,
    nul_json,
    qemu_io,
    read_reply,
    request,
    run,
    trigger_lu,
    trigger_path,
    trigger_record,
    wait_in_sync,
    wait_ready,
)

SIZE = 8 * MiB
BEFORE = (
    "write -P 0x11 0 64k",
    "write -P 0x12 1M 1M",
    "write -P 0x13 100000 3001",  # unaligned head and tail
    "write -P 0x14 7M 4k",
    "aio_write -P 0x15 4M 64k",
    "aio_write -P 0x16 4160k 64k",
    "aio_flush",
)
AFTER = (
    "write -P 0x21 0 4k",  # over a chunk the generation holds
    "write -P 0x22 1536k 64k",  # inside the 0x12 run
    "write -P 0x23 6M 128k",  # where the generation has a hole
    "write -z 7M 4k",
    "discard 4M 64k",
)


@pytest.fixture(autouse=True)
def _programs() -> None:
    need("qemu-io", "qemu-img", "nbdinfo", "nbdcopy")


@pytest.fixture
def lu(device: DeviceProcess) -> Iterator[str]:
    name = f"split-{time.monotonic_ns()}"
    api(device, "POST", "/v1/lus", {"name": name, "size": SIZE, "pool": 3}, expect=201)
    yield name
    api(device, "DELETE", f"/v1/lus/{name}?force=true", expect=204)


def by_trigger_lu(device: DeviceProcess, name: str, label: str) -> dict:
    return trigger_lu(device, name, label=label)["generations"][0]


def by_path(device: DeviceProcess, name: str, label: str) -> dict:
    return trigger_path(device, name, label)["generations"][0]


def by_in_band(device: DeviceProcess, name: str, label: str) -> dict:
    with NbdClient(device.uri(name), contexts=("mirrorpool:trigger",)) as client:
        return client.trigger(label)["generations"][0]


def by_api(device: DeviceProcess, name: str, label: str) -> dict:
    return api_trigger(device, name, label)


MECHANISMS: dict[str, tuple[Callable[[DeviceProcess, str, str], dict], str]] = {
    "trigger-lu": (by_trigger_lu, "trigger-lu"),
    "path": (by_path, "path"),
    "in-band": (by_in_band, "in-band"),
    "api": (by_api, "api"),
}


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_generation_holds_exactly_the_writes_before_the_trigger(
    device: DeviceProcess, lu: str, tmp_path: Path, mechanism: str
) -> None:
    trigger, source = MECHANISMS[mechanism]
    uri = device.uri(lu)
    qemu_io(uri, *BEFORE)
    made = trigger(device, lu, f"by {mechanism}")
    assert (made["lu"], made["gen"], made["source"], made["label"]) == (
        lu, 1, source, f"by {mechanism}")
    qemu_io(uri, *AFTER)

    prefix = make_reference(tmp_path / "prefix.img", SIZE, *BEFORE)
    full = make_reference(tmp_path / "full.img", SIZE, *BEFORE, *AFTER)
    gen_uri = device.uri(f"{lu}@{made['gen']}")
    assert_identical(gen_uri, str(prefix))
    assert_identical(uri, str(full))
    assert not identical(gen_uri, str(full))[0]  # calibration: the later writes are seen
    listed = {g["gen"]: g for g in generations(device, lu)}
    assert listed[made["gen"]]["trigger_id"] == made["trigger_id"]
    assert listed[made["gen"]]["source"] == source


def test_generation_export_is_read_only(device: DeviceProcess, lu: str) -> None:
    qemu_io(device.uri(lu), "write -P 0x11 0 4k")
    gen = api_trigger(device, lu)["gen"]
    h = connect(device.uri(f"{lu}@{gen}"))
    try:
        assert h.is_read_only()
    finally:
        close(h)
    result = run(["qemu-io", "-f", "raw", device.uri(f"{lu}@{gen}"), "-c",
                  "write -P 0x99 0 4k"], check=False)
    assert result.returncode != 0, "a generation was opened for writing"
    assert b"Permission denied" in result.stderr + result.stdout
    out = run(["qemu-io", "-r", "-f", "raw", device.uri(f"{lu}@{gen}"), "-c",
               "read -P 0x11 0 4k"]).stdout
    assert b"failed" not in out


def test_copies_of_a_generation_skip_its_holes(
    device: DeviceProcess, lu: str, tmp_path: Path
) -> None:
    uri = device.uri(lu)
    qemu_io(uri, *BEFORE)
    gen = api_trigger(device, lu)["gen"]
    qemu_io(uri, *AFTER)
    wait_ready(device, lu, gen)
    gen_uri = device.uri(f"{lu}@{gen}")

    runs = nbdinfo_map(gen_uri)
    check_coverage(runs, SIZE)
    data = [(r.offset, r.length) for r in runs if not r.flags & HOLE]
    holes = [r for r in runs if r.flags & HOLE]
    assert holes, f"no holes reported on {gen_uri}: {runs}"
    assert all(r.flags & ZERO for r in holes)
    # every written range is data, and nothing far from them is
    for off, length in ((0, 64 * 1024), (MiB, MiB), (7 * MiB, 4096), (4 * MiB, 128 * 1024)):
        assert any(o <= off and off + length <= o + n for o, n in data), (off, runs)
    assert sum(n for _, n in data) <= 2 * MiB + 4 * CHUNK
    for r in runs:  # 6M..7M was written only after the trigger: a hole in the generation
        if r.offset < 7 * MiB and r.end > 6 * MiB:
            assert r.flags & HOLE, runs

    prefix = make_reference(tmp_path / "prefix.img", SIZE, *BEFORE)
    by_nbdcopy = tmp_path / "nbdcopy.img"
    run(["nbdcopy", gen_uri, str(by_nbdcopy)])
    by_qemu = tmp_path / "qemu.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", gen_uri, str(by_qemu)])
    for copy in (by_nbdcopy, by_qemu):
        assert_identical(str(copy), str(prefix))
        assert copy.stat().st_size == SIZE
        assert copy.stat().st_blocks * 512 <= 3 * MiB, f"{copy.name}: holes were written out"


def test_changed_context_lists_what_was_written_since_a_generation(
    device: DeviceProcess, lu: str
) -> None:
    uri = device.uri(lu)
    qemu_io(uri, *BEFORE)
    g1 = api_trigger(device, lu)["gen"]
    ctx = f"mirrorpool:changed:{g1}"
    runs = changed_runs(uri, ctx)
    assert sum(n for _, n, _ in runs) == SIZE
    assert flagged(runs) == [], "nothing was written since the trigger"

    qemu_io(uri, "write -P 0x31 0 4k", "write -P 0x32 2M 100k", f"write -P 0x33 {SIZE - 1} 1")
    expected = chunk_ranges([(0, 4096), (2 * MiB, 100 * 1024), (SIZE - 1, 1)], SIZE)
    runs = changed_runs(uri, ctx)
    assert sum(n for _, n, _ in runs) == SIZE
    assert flagged(runs) == expected

    # on a later generation, the context is the change between the two generations
    g2 = api_trigger(device, lu)["gen"]
    qemu_io(uri, "write -P 0x34 5M 4k")
    assert flagged(changed_runs(device.uri(f"{lu}@{g2}"), ctx)) == expected
    assert flagged(changed_runs(uri, f"mirrorpool:changed:{g2}")) == [(5 * MiB, CHUNK)]
    assert flagged(changed_runs(uri, ctx)) == chunk_ranges(
        [(0, 4096), (2 * MiB, 100 * 1024), (SIZE - 1, 1), (5 * MiB, 1)], SIZE)
    # a generation that does not exist has no context
    result = run(["nbdinfo", "--map=mirrorpool:changed:99", uri], check=False)
    assert result.returncode != 0


@pytest.mark.parametrize("mechanism", ["trigger-lu", "api"])
def test_consistency_group_splits_two_lus_at_one_cut(
    device: DeviceProcess, lu: str, tmp_path: Path, mechanism: str
) -> None:
    other = f"{lu}-b"
    api(device, "POST", "/v1/lus", {"name": other, "size": SIZE, "pool": 3}, expect=201)
    try:
        a, b = device.uri(lu), device.uri(other)
        qemu_io(a, *BEFORE[:3])
        qemu_io(b, *BEFORE[3:])
        if mechanism == "trigger-lu":
            answer = trigger_lu(device, lu, other, label="group")
        else:
            answer = api(device, "POST", "/v1/trigger", {"lus": [other, lu], "label": "group"})
        gens = {g["lu"]: g for g in answer["generations"]}  # type: ignore[index]
        assert set(gens) == {lu, other}
        assert {g["trigger_id"] for g in gens.values()} == {answer["trigger_id"]}  # type: ignore
        qemu_io(a, *AFTER[:2])
        qemu_io(b, *AFTER[2:])
        assert_identical(device.uri(f"{lu}@{gens[lu]['gen']}"),
                         str(make_reference(tmp_path / "a.img", SIZE, *BEFORE[:3])))
        assert_identical(device.uri(f"{other}@{gens[other]['gen']}"),
                         str(make_reference(tmp_path / "b.img", SIZE, *BEFORE[3:])))
        assert_identical(a, str(make_reference(tmp_path / "a2.img", SIZE, *BEFORE[:3],
                                               *AFTER[:2])))
    finally:
        api(device, "DELETE", f"/v1/lus/{other}?force=true", expect=204)


@pytest.mark.parametrize("mechanism", ["trigger-lu", "api"])
def test_consistency_group_cut_is_consistent_under_writes(
    device: DeviceProcess, lu: str, mechanism: str
) -> None:
    """A writer puts n on LU A, then (after A acknowledged) n on LU B, n = 1, 2, ...

    In any group generation holding a on A and b on B: b in {a - 1, a}."""
    other = f"{lu}-b"
    api(device, "POST", "/v1/lus", {"name": other, "size": MiB, "pool": 3}, expect=201)
    stop = threading.Event()
    errors: list[BaseException] = []
    written = [0]

    def writer() -> None:
        try:
            ha, hb = connect(device.uri(lu)), connect(device.uri(other))
            n = 0
            while not stop.is_set():
                n += 1
                block = n.to_bytes(8, "big") * 512
                ha.pwrite(block, 0)
                hb.pwrite(block, 0)
                written[0] = n
            close(ha)
            close(hb)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        pairs = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline or len(pairs) < 5:
            if mechanism == "trigger-lu":
                answer = trigger_lu(device, lu, other)
            else:
                answer = api(device, "POST", "/v1/trigger", {"lus": [lu, other]})
            gens = {g["lu"]: g["gen"] for g in answer["generations"]}  # type: ignore[index]
            got = []
            for name in (lu, other):
                h = connect(device.uri(f"{name}@{gens[name]}"))
                block = bytes(h.pread(4096, 0))
                close(h)
                values = {block[i : i + 8] for i in range(0, 4096, 8)}
                assert len(values) == 1, f"torn block in {name}@{gens[name]}"
                got.append(int.from_bytes(values.pop(), "big"))
            pairs.append(tuple(got))
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(10)
        api(device, "DELETE", f"/v1/lus/{other}?force=true", expect=204)
    assert not errors, errors
    assert written[0] > 10, "the writer hardly ran"
    bad = [(a, b) for a, b in pairs if b not in (a - 1, a)]
    assert not bad, f"group generations that are not one cut (A, B): {bad} of {pairs}"
    assert len({a for a, _ in pairs}) > 1, f"every cut saw the same write: {pairs}"


def test_mirror_equals_the_primary_once_in_sync(device: DeviceProcess, lu: str) -> None:
    """Overlapping writes in flight at once, from several connections; then, once in
    sync, a generation taken with nothing in flight equals the primary byte for byte."""
    uri = device.uri(lu)
    qemu_io(uri, *BEFORE)
    api_trigger(device, lu)  # the next active backup starts syncing from here
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        try:
            h = connect(uri)
            cookies = []
            for i in range(200):
                off = ((seed * 7919 + i * 104729) % (SIZE // 512 - 256)) * 512
                length = 512 * (1 + (seed + i) % 200)  # overlapping, unaligned runs
                buf = bytes([(seed * 31 + i) % 256]) * length
                cookies.append(h.aio_pwrite(buf, off))
                if len(cookies) >= 16:
                    while not h.aio_command_completed(cookies[0]):
                        h.poll(-1)
                    cookies.pop(0)
            while cookies:
                while not h.aio_command_completed(cookies[0]):
                    h.poll(-1)
                cookies.pop(0)
            h.aio_flush()
            close(h)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,), daemon=True) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    wait_in_sync(device, lu)
    status = json.loads(device.cli("status", "--json").stdout)
    (state,) = [x["mirror"] for x in status["lus"] if x["name"] == lu]
    assert state["active_state"] == "in-sync"
    assert state["sync"]["chunks_left"] == 0 and state["sync"]["percent"] == 100.0
    assert state["generations"] == 1 and state["last_trigger"]["gen"] == 1
    gen = api_trigger(device, lu)["gen"]
    listed = {g["gen"]: g for g in generations(device, lu)}
    assert listed[gen]["state"] == "ready", "the active backup was not in sync"
    assert_identical(device.uri(f"{lu}@{gen}"), uri)


def test_trigger_record_refused_for_one_lu_splits_none(device: DeviceProcess, lu: str) -> None:
    """A trigger record naming an LU that cannot split (no pool) fails the WRITE, and
    the other LU named is not split either: a group is one cut or nothing."""
    bare = f"{lu}-nopool"
    api(device, "POST", "/v1/lus", {"name": bare, "size": MiB, "pool": 0}, expect=201)
    try:
        h = connect(device.uri(".trigger"))
        try:
            with pytest.raises(nbd.Error) as refused:
                h.pwrite(trigger_record(lu, bare, label="all or nothing"), 0)
            assert refused.value.errno in ("ENOSPC", "EINVAL"), refused.value
            with pytest.raises(nbd.Error):  # and an unknown LU, likewise
                h.pwrite(trigger_record(lu, f"{lu}-missing"), 0)
            with pytest.raises(nbd.Error):  # and a record not at offset 0
                h.pwrite(trigger_record(lu), 512)
            h.pwrite(trigger_record(lu, label="alone"), 0)  # the connection goes on
            answer = nul_json(h.pread(4096, 0))
        finally:
            close(h)
        assert [g["label"] for g in generations(device, lu)] == ["alone"]
        assert answer["generations"][0]["gen"] == 1
    finally:
        api(device, "DELETE", f"/v1/lus/{bare}?force=true", expect=204)



def test_trigger_while_the_active_backup_is_syncing_is_exact(
    device: DeviceProcess, tmp_path: Path
) -> None:
    """DESIGN invariant 4: two TRIGGERs and then writes, sent back to back on one
    connection.  The first split leaves a blank active backup with every allocated chunk
    still to copy; the second freezes that one mid-copy; the writes then hit chunks near
    the end, which the copy (lowest chunk first) has not reached (copy-before-write).
    Both generations must be the same exact prefix, while the copy runs and after it."""
    size = 128 * MiB
    STRIDE = 64 * 1024  # noqa: N806 - spacing of the writes, several per tracking chunk run
    chunks = size // STRIDE
    name = f"syncing-{time.monotonic_ns()}"
    api(device, "POST", "/v1/lus", {"name": name, "size": size, "pool": 3}, expect=201)
    try:
        # 4 KiB of data in every chunk: many small extents, so the copy takes a while
        prefix_path = tmp_path / "prefix.img"
        with open(prefix_path, "wb") as ref:
            ref.truncate(size)
            h = connect(device.uri(name))
            try:
                for c in range(chunks):
                    data, off = bytes([c % 251 + 1]) * 4096, c * STRIDE + (c % 16) * 4096
                    ref.seek(off)
                    ref.write(data)
                    h.aio_pwrite(data, off)
                    while h.aio_in_flight() > 32:
                        h.poll(-1)
                while h.aio_in_flight():
                    h.poll(-1)
            finally:
                close(h)
        after = [(0x51, (chunks - 48) * STRIDE, MiB + 4096),
                 (0x52, (chunks - 10) * STRIDE + 512, 8192),
                 (0x53, size - 4096, 4096), (0x54, (chunks - 100) * STRIDE + 4096, 4096)]
        full_path = tmp_path / "full.img"
        run(["cp", "--sparse=always", str(prefix_path), str(full_path)])
        with open(full_path, "r+b") as ref:
            for byte, off, n in after:
                ref.seek(off)
                ref.write(bytes([byte]) * n)

        conn = rawnbd.open_export(device.nbd_port, name, structured=True,
                                  contexts=("mirrorpool:trigger",))
        try:
            burst = request(1, TRIGGER_CMD, 0, b"first") + request(2, TRIGGER_CMD, 0, b"second")
            for i, (byte, off, n) in enumerate(after):
                burst += request(10 + i, rawnbd.CMD_WRITE, off, bytes([byte]) * n)
            conn.send(burst)
            replies = {}
            for _ in range(2 + len(after)):
                cookie, error, body = read_reply(conn)
                assert error == 0, (cookie, error, body)
                replies[cookie] = body
        finally:
            conn.close()
        g1 = json.loads(replies[1])["generations"][0]["gen"]
        g2 = json.loads(replies[2])["generations"][0]["gen"]
        assert g2 == g1 + 1
        # at once, while the copy most likely runs: the regions the later writes hit
        states = {g["gen"]: g["state"] for g in generations(device, name)}
        h = connect(device.uri(f"{name}@{g2}"))
        try:
            with open(prefix_path, "rb") as ref:
                for _, off, n in after:
                    start = off // STRIDE * STRIDE
                    length = min(size, (off + n + STRIDE - 1) // STRIDE * STRIDE) - start
                    ref.seek(start)
                    assert h.pread(length, start) == ref.read(length), (off, states)
        finally:
            close(h)
        assert_reads_as(device.uri(name), full_path)
        wait_ready(device, name, g2)
        assert_reads_as(device.uri(f"{name}@{g2}"), prefix_path)
        assert_reads_as(device.uri(f"{name}@{g1}"), prefix_path)
        wait_in_sync(device, name)
        g3 = api_trigger(device, name)["gen"]
        assert_reads_as(device.uri(f"{name}@{g3}"), full_path)
    finally:
        api(device, "DELETE", f"/v1/lus/{name}?force=true", expect=204)


def test_qemu_img_copies_a_generation_with_many_extents_in_time(
    device: DeviceProcess, tmp_path: Path
) -> None:
    size = 64 * MiB
    name = f"extents-{time.monotonic_ns()}"
    api(device, "POST", "/v1/lus", {"name": name, "size": size, "pool": 2}, expect=201)
    try:
        h = connect(device.uri(name))
        try:
            for c in range(size // CHUNK):
                h.aio_pwrite(bytes([c % 251 + 1]) * 4096, c * CHUNK)
                while h.aio_in_flight() > 32:
                    h.poll(-1)
            while h.aio_in_flight():
                h.poll(-1)
        finally:
            close(h)
        gen = api_trigger(device, name)["gen"]
        wait_ready(device, name, gen)
        gen_uri = device.uri(f"{name}@{gen}")
        by_nbdcopy = tmp_path / "nbdcopy.img"
        started = time.monotonic()
        run(["nbdcopy", gen_uri, str(by_nbdcopy)])
        assert time.monotonic() - started < 3  # the same data, read by a client that batches
        by_qemu = tmp_path / "qemu.img"
        try:
            run(["qemu-img", "convert", "-f", "raw", "-O", "raw", gen_uri, str(by_qemu)],
                timeout=3)
        except subprocess.TimeoutExpired:
            pytest.fail("qemu-img convert of a 64 MiB generation took more than 3 s")
        assert by_qemu.read_bytes() == by_nbdcopy.read_bytes()
    finally:
        api(device, "DELETE", f"/v1/lus/{name}?force=true", expect=204)
