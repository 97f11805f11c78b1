"""`mirrorpool restore NAME --from GEN [--force] [--json]` against a real device.

Setting up and checking go through the control API and real NBD clients (qemu-io,
qemu-img, nbdcopy, libnbd); the CLI runs only for the command under test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.conftest import (
    api_create,
    api_delete,
    assert_refused,
    cli_json,
    flat,
    nbd_session,
    unique,
)
from tests.helpers.processes import DeviceProcess
from tests.mirror_support import (
    CHUNK,
    MiB,
    api,
    api_trigger,
    assert_identical,
    generations,
    identical,
    lu_path,
    make_reference,
    mirror,
    qemu_io,
    read_export,
    run,
    wait_in_sync,
)

SIZE = 4 * MiB
GEN1 = ("write -P 0x11 0 64k", "write -P 0x12 1M 200k", "write -P 0x13 3M 4k")
GEN2 = ("write -P 0x21 0 4k", "write -P 0x22 2M 64k", "write -z 1M 64k")
LATER = ("write -P 0x31 1M 4k", "write -P 0x32 3584k 512k", "discard 3M 64k")


@pytest.fixture
def history(device: DeviceProcess, tmp_path: Path) -> Iterator[tuple[str, int, int, Path]]:
    """GEN1 writes, generation g1, GEN2 writes, generation g2, LATER writes.

    Also a copy of g2 taken with nbdcopy before anything is restored."""
    name = api_create(device, SIZE, pool=4)
    uri = device.uri(name)
    qemu_io(uri, *GEN1)
    g1 = api_trigger(device, name)["gen"]
    qemu_io(uri, *GEN2)
    g2 = api_trigger(device, name)["gen"]
    qemu_io(uri, *LATER)
    g2_copy = tmp_path / "g2-before.img"
    run(["nbdcopy", device.uri(f"{name}@{g2}"), str(g2_copy)])
    yield name, g1, g2, g2_copy
    api_delete(device, name)


def diff_chunks(device: DeviceProcess, name: str, gen: int) -> int:
    answer = api(device, "GET", f"{lu_path(name)}/diff?from={gen}")
    return sum(e["length"] for e in answer["extents"]) // CHUNK  # type: ignore[index]


def test_restore_json_makes_the_primary_equal_the_generation(
    device: DeviceProcess, history: tuple[str, int, int, Path], tmp_path: Path
) -> None:
    name, g1, g2, g2_copy = history
    uri = device.uri(name)
    assert not identical(uri, device.uri(f"{name}@{g1}"))[0]  # calibration: they differ now
    changed = diff_chunks(device, name, g1)
    gens_before = generations(device, name)

    answer = cli_json(device, "restore", name, "--from", str(g1))
    assert answer == {"lu": name, "gen": g1, "chunks_copied": changed,
                      "bytes_copied": changed * CHUNK}

    assert_identical(uri, device.uri(f"{name}@{g1}"))
    assert_identical(uri, str(make_reference(tmp_path / "g1.img", SIZE, *GEN1)))
    # the generations are untouched: g1 still holds GEN1, g2 is what it was
    assert_identical(device.uri(f"{name}@{g1}"), str(tmp_path / "g1.img"))
    assert_identical(device.uri(f"{name}@{g2}"), str(g2_copy))
    assert generations(device, name) == gens_before
    # and the restore went to the mirror too: a new generation equals the primary
    wait_in_sync(device, name)
    g3 = api_trigger(device, name)["gen"]
    assert_identical(device.uri(f"{name}@{g3}"), uri)


def test_restore_prints_a_summary(
    device: DeviceProcess, history: tuple[str, int, int, Path]
) -> None:
    name, g1, g2, g2_copy = history
    changed = diff_chunks(device, name, g2)
    result = device.cli("restore", name, "--from", str(g2))
    assert flat(result.stdout) == (
        f"restored {name} from generation {g2}: {changed} chunk(s),"
        f" {changed * CHUNK} bytes copied")
    assert_identical(device.uri(name), str(g2_copy))


def test_restore_refused_while_a_client_is_connected_then_forced(
    device: DeviceProcess, history: tuple[str, int, int, Path], tmp_path: Path
) -> None:
    name, g1, g2, g2_copy = history
    uri = device.uri(name)
    primary_before = tmp_path / "primary-before.img"
    run(["nbdcopy", uri, str(primary_before)])
    with nbd_session(uri) as h:
        assert h.pread(4096, 1 * MiB) == b"\x31" * 4096
        result = device.cli("restore", name, "--from", str(g1), check=False)
        assert_refused(result, f"LU '{name}' has 1 connected client(s)", "--force")
        assert_identical(uri, str(primary_before))  # nothing was restored
        assert h.pread(4096, 1 * MiB) == b"\x31" * 4096  # the client is still served

        answer = cli_json(device, "restore", name, "--from", str(g1), "--force")
        assert answer["gen"] == g1  # type: ignore[index]
        assert h.pread(4096, 1 * MiB) == b"\x12" * 4096  # the client sees g1's data
    assert_identical(uri, device.uri(f"{name}@{g1}"))
    assert_identical(device.uri(f"{name}@{g2}"), str(g2_copy))


def test_restore_from_an_unknown_generation(
    device: DeviceProcess, history: tuple[str, int, int, Path], tmp_path: Path
) -> None:
    name, g1, g2, g2_copy = history
    uri = device.uri(name)
    primary_before = tmp_path / "primary-before.img"
    run(["nbdcopy", uri, str(primary_before)])
    gens_before = generations(device, name)
    result = device.cli("restore", name, "--from", str(g2 + 10), check=False)
    assert_refused(result, f"LU '{name}' has no generation {g2 + 10}")
    assert_identical(uri, str(primary_before))
    assert generations(device, name) == gens_before


def test_restore_of_an_unknown_lu(device: DeviceProcess) -> None:
    missing = unique("missing")
    assert_refused(device.cli("restore", missing, "--from", "1", check=False),
                   f"no LU named '{missing}'")


def test_restore_refuses_generation_zero(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=2)
    try:
        result = device.cli("restore", name, "--from", "0", check=False)
        assert_refused(result, "gen")
        assert mirror(device, name)["last_seq"] == 0
    finally:
        api_delete(device, name)


def test_restore_counts_the_bytes_of_a_partial_last_chunk(device: DeviceProcess) -> None:
    size = MiB + 4096  # 16 whole chunks and a last one of 4 KiB
    name = api_create(device, size, pool=3)
    try:
        g1 = api_trigger(device, name)["gen"]
        qemu_io(device.uri(name), "write -P 1 0 4k", f"write -P 2 {MiB} 4k")
        diff = api(device, "GET", f"{lu_path(name)}/diff?from={g1}")
        assert diff["changed_bytes"] == CHUNK + 4096  # type: ignore[index]
        answer = cli_json(device, "restore", name, "--from", str(g1))
        assert read_export(device.uri(name)) == bytes(size)  # the restore itself is right
        assert answer["chunks_copied"] == 2  # type: ignore[index]
        assert answer["bytes_copied"] == CHUNK + 4096  # type: ignore[index]
    finally:
        api_delete(device, name)
