"""`mirrorpool export NAME@GEN FILE [--json]`: a generation into a sparse file.

Setting up and checking go through the control API and real NBD clients; the CLI runs
only for the command under test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.cli.conftest import api_create, api_delete, assert_refused, flat, unique
from tests.helpers.processes import DeviceProcess
from tests.mirror_support import (
    KiB,
    MiB,
    api_trigger,
    assert_identical,
    generations,
    make_reference,
    qemu_io,
    wait_no_readers,
    wait_ready,
)

SIZE = 8 * MiB
BEFORE = ("write -P 0x11 0 64k", "write -P 0x22 3M 100k", "write -P 0x33 7M 4k")
AFTER = ("write -P 0x44 0 4k", "write -P 0x55 5M 1M")


def lu_with_generation(device: DeviceProcess) -> tuple[str, int]:
    """An LU with data before a trigger and more after it; the generation made."""
    name = api_create(device, SIZE, pool=3)
    qemu_io(device.uri(name), *BEFORE)
    gen = api_trigger(device, name)["gen"]
    qemu_io(device.uri(name), *AFTER)
    wait_ready(device, name, gen)
    return name, gen


def test_export_json_writes_the_generation_sparse(device: DeviceProcess, tmp_path: Path) -> None:
    name, gen = lu_with_generation(device)
    try:
        out = tmp_path / "gen.img"
        result = device.cli("export", f"{name}@{gen}", str(out), "--json")
        assert result.stderr == ""  # no progress bar in --json mode
        answer = json.loads(result.stdout)
        assert answer == {"export": f"{name}@{gen}", "file": str(out), "size": SIZE,
                          "data_bytes": answer["data_bytes"]}
        # the data written before the trigger, at least; never the holes around it
        assert 64 * KiB + 100 * KiB + 4 * KiB <= answer["data_bytes"] <= 256 * KiB
        assert out.stat().st_size == SIZE
        assert out.stat().st_blocks * 512 <= 512 * KiB, "holes were written out"
        assert_identical(str(out), str(make_reference(tmp_path / "ref.img", SIZE, *BEFORE)))
        wait_no_readers(device, name)  # the export was closed after the copy
    finally:
        api_delete(device, name)


def test_export_prints_a_summary(device: DeviceProcess, tmp_path: Path) -> None:
    name, gen = lu_with_generation(device)
    try:
        out = tmp_path / "gen.img"
        result = device.cli("export", f"{name}@{gen}", str(out))
        text = flat(result.stdout.strip().splitlines()[-1])  # after the progress bar
        assert text.startswith(f"exported {name}@{gen} to {out}: {SIZE} bytes, "), text
        assert text.endswith(" bytes of data"), text
        assert_identical(str(out), str(make_reference(tmp_path / "ref.img", SIZE, *BEFORE)))
    finally:
        api_delete(device, name)


def test_export_of_a_missing_generation(device: DeviceProcess, tmp_path: Path) -> None:
    name, gen = lu_with_generation(device)
    try:
        before = generations(device, name)
        out = tmp_path / "missing.img"
        result = device.cli("export", f"{name}@{gen + 7}", str(out), check=False)
        assert_refused(result, f"export of {name}@{gen + 7} failed", f"'{name}@{gen + 7}'")
        assert not out.exists()
        assert generations(device, name) == before
    finally:
        api_delete(device, name)


def test_export_refuses_what_is_not_a_generation(device: DeviceProcess, tmp_path: Path) -> None:
    name = api_create(device, "1M", pool=2)
    missing = unique("missing")
    try:
        out = tmp_path / "x.img"
        assert_refused(device.cli("export", name, str(out), check=False),
                       f"'{name}': name a generation as NAME@GEN")
        assert_refused(device.cli("export", f"{name}@latest", str(out), check=False),
                       "NAME@GEN")
        assert_refused(device.cli("export", f"{missing}@1", str(out), check=False),
                       f"export of {missing}@1 failed")
        assert not out.exists()
    finally:
        api_delete(device, name)


def test_export_does_not_overwrite_on_a_refusal(device: DeviceProcess, tmp_path: Path) -> None:
    name = api_create(device, "1M", pool=2)
    try:
        out = tmp_path / "keep.img"
        out.write_bytes(b"precious")
        result = device.cli("export", f"{name}@1", str(out), check=False)
        assert_refused(result, f"export of {name}@1 failed")
        assert out.read_bytes() == b"precious"
        assert os.path.getsize(out) == 8
    finally:
        api_delete(device, name)
