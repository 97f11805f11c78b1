"""`mirrorpool diff NAME@G1 NAME@G2 [--json]` and `diff NAME@G1 NAME` (against the primary now).

Setting up and checking go through the control API and real NBD clients; the CLI runs
only for the command under test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mirrorpool.sizes import format_size
from tests.cli.conftest import (
    api_create,
    api_delete,
    assert_refused,
    cli_json,
    flat,
    table_header,
    table_rows,
    unique,
)
from tests.helpers.processes import DeviceProcess
from tests.mirror_support import (
    CHUNK,
    KiB,
    MiB,
    api_trigger,
    chunk_ranges,
    close,
    connect,
    generations,
    qemu_io,
)

SIZE = 4 * MiB


def extents(*ranges: tuple[int, int]) -> list[dict]:
    return [{"offset": off, "length": n} for off, n in ranges]


@pytest.fixture
def history(device: DeviceProcess) -> Iterator[tuple[str, int, int]]:
    """An LU: writes, generation G1, writes, generation G2, more writes."""
    name = api_create(device, SIZE, pool=4)
    uri = device.uri(name)
    qemu_io(uri, "write -P 1 0 64k", "write -P 2 1M 4k")
    g1 = api_trigger(device, name)["gen"]
    # one byte at 320k, 2M..2M+100k and the last 512 bytes
    qemu_io(uri, "write -P 3 327680 1", "write -P 4 2M 100k", f"write -P 5 {SIZE - 512} 512")
    g2 = api_trigger(device, name)["gen"]
    qemu_io(uri, "write -z 1M 4k", "discard 3M 64k")
    yield name, g1, g2
    api_delete(device, name)


G1_TO_G2 = extents(*chunk_ranges([(327680, 1), (2 * MiB, 100 * KiB), (SIZE - 512, 512)], SIZE))
AFTER_G2 = extents(*chunk_ranges([(MiB, 4 * KiB), (3 * MiB, 64 * KiB)], SIZE))


def test_diff_json_between_two_generations(
    device: DeviceProcess, history: tuple[str, int, int]
) -> None:
    name, g1, g2 = history
    answer = cli_json(device, "diff", f"{name}@{g1}", f"{name}@{g2}")
    assert answer == {"lu": name, "from": g1, "to": g2, "chunk_size": CHUNK,
                      "changed_bytes": sum(e["length"] for e in G1_TO_G2), "extents": G1_TO_G2}
    # the order of the two sides does not matter
    assert cli_json(device, "diff", f"{name}@{g2}", f"{name}@{g1}") == answer


def test_diff_json_against_the_primary(
    device: DeviceProcess, history: tuple[str, int, int]
) -> None:
    name, g1, g2 = history
    since_g1 = cli_json(device, "diff", f"{name}@{g1}", name)
    assert since_g1["to"] == "primary" and since_g1["from"] == g1  # type: ignore[index]
    merged = sorted(G1_TO_G2 + AFTER_G2, key=lambda e: e["offset"])
    assert since_g1["extents"] == merged  # type: ignore[index]
    assert since_g1["changed_bytes"] == sum(  # type: ignore[index]
        e["length"] for e in extents(*chunk_ranges(
            [(327680, 1), (2 * MiB, 100 * KiB), (SIZE - 512, 512), (MiB, 4 * KiB),
             (3 * MiB, 64 * KiB)], SIZE)))
    since_g2 = cli_json(device, "diff", f"{name}@{g2}", name)
    assert since_g2["extents"] == AFTER_G2  # type: ignore[index]


def test_diff_agrees_with_the_changed_meta_context(
    device: DeviceProcess, history: tuple[str, int, int]
) -> None:
    """The CLI's extents are the runs flagged in mirrorpool:changed:G1 on NAME@G2."""
    name, g1, g2 = history
    answer = cli_json(device, "diff", f"{name}@{g1}", f"{name}@{g2}")
    ctx = f"mirrorpool:changed:{g1}"
    h = connect(device.uri(f"{name}@{g2}"), ctx)
    try:
        assert h.can_meta_context(ctx)
        runs: list[tuple[int, int, int]] = []

        def collect(meta: str, offset: int, entries: list[int], err: int) -> int:
            if meta == ctx:
                pos = offset
                for length, flags in zip(entries[::2], entries[1::2], strict=True):
                    runs.append((pos, length, flags))
                    pos += length
            return 0

        offset = 0
        while offset < SIZE:
            before = len(runs)
            h.block_status(SIZE - offset, offset, collect)
            assert len(runs) > before
            offset = runs[-1][0] + runs[-1][1]
    finally:
        close(h)
    flagged = [{"offset": o, "length": n} for o, n, f in runs if f & 1]
    merged: list[dict] = []
    for e in flagged:
        if merged and merged[-1]["offset"] + merged[-1]["length"] == e["offset"]:
            merged[-1]["length"] += e["length"]
        else:
            merged.append(dict(e))
    assert merged == answer["extents"]  # type: ignore[index]


def test_diff_table(device: DeviceProcess, history: tuple[str, int, int]) -> None:
    name, g1, g2 = history
    out = device.cli("diff", f"{name}@{g1}", f"{name}@{g2}").stdout
    assert table_header(out) == ["offset", "length"]
    assert table_rows(out) == [[str(e["offset"]), str(e["length"])] for e in G1_TO_G2]
    summary = flat(out.strip().splitlines()[-1])
    changed = format_size(sum(e["length"] for e in G1_TO_G2))
    assert summary == f"3 extent(s), {changed} changed between {g1} and {g2}", summary


def test_diff_with_nothing_changed(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=3)
    try:
        g1 = api_trigger(device, name)["gen"]
        g2 = api_trigger(device, name)["gen"]
        answer = cli_json(device, "diff", f"{name}@{g1}", f"{name}@{g2}")
        assert answer["extents"] == [] and answer["changed_bytes"] == 0  # type: ignore[index]
    finally:
        api_delete(device, name)


def test_diff_across_two_lus(device: DeviceProcess) -> None:
    first, second = api_create(device, "1M", pool=2), api_create(device, "1M", pool=2)
    try:
        api_trigger(device, first)
        api_trigger(device, second)
        result = device.cli("diff", f"{first}@1", f"{second}@1", check=False)
        assert_refused(result, "both sides must be generations of one LU",
                       f"'{first}' and '{second}'")
        assert_refused(device.cli("diff", f"{first}@1", second, "--json", check=False),
                       "both sides must be generations of one LU")
        assert [g["gen"] for g in generations(device, first)] == [1]
    finally:
        api_delete(device, first)
        api_delete(device, second)


def test_diff_refuses_bad_references(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=2)
    missing = unique("missing")
    try:
        g1 = api_trigger(device, name)["gen"]
        assert_refused(device.cli("diff", f"{name}@{g1}", f"{name}@{g1 + 5}", check=False),
                       f"LU '{name}' has no generation {g1 + 5}")
        assert_refused(device.cli("diff", name, f"{name}@{g1}", check=False),
                       "the first side must be a generation (NAME@GEN)")
        assert_refused(device.cli("diff", f"{name}@x", name, check=False),
                       "write NAME@GEN with a generation number")
        assert_refused(device.cli("diff", f"{missing}@1", missing, check=False),
                       f"no LU named '{missing}'")
    finally:
        api_delete(device, name)


def test_unaligned_write_marks_every_chunk_it_touches(device: DeviceProcess) -> None:
    name = api_create(device, "1M", pool=2)
    try:
        g1 = api_trigger(device, name)["gen"]
        qemu_io(device.uri(name), f"write -P 9 {CHUNK - 512} {KiB}")  # straddles chunks 0-1
        answer = cli_json(device, "diff", f"{name}@{g1}", name)
        assert answer["extents"] == extents((0, 2 * CHUNK))  # type: ignore[index]
    finally:
        api_delete(device, name)
