"""qemu-img against every target: info, convert both ways, compare, map."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Target, need
from tests.interop.support import MiB, assert_flags, check_coverage, qemu_img_map, random_bytes, run


@pytest.fixture(autouse=True)
def _programs() -> None:
    need("qemu-img", "qemu-io")


def test_info_reports_size(target: Target) -> None:
    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", target.uri]).stdout)
    assert info["virtual-size"] == target.size
    assert info["format"] == "raw"


def test_info_reports_unaligned_size(target: Target, make_export: Callable[[int], Target]) -> None:
    odd = make_export(5 * MiB + 7 * 512)
    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", odd.uri]).stdout)
    assert info["virtual-size"] == 5 * MiB + 7 * 512


def test_convert_file_to_export_and_back(target: Target, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = random_bytes(8 * MiB + 4096, seed=1)
    src.write_bytes(data)

    # -n: the export exists already; -W and -m 8: out-of-order, pipelined writes.
    run(["qemu-img", "convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw",
         str(src), target.uri])
    # The export is larger than the file; compare needs the rest to read as zeros.
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), target.uri])

    out = tmp_path / "out.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", target.uri, str(out)])
    assert out.stat().st_size == target.size
    with out.open("rb") as f:
        assert f.read(len(data)) == data
        rest = f.read()
    assert len(rest) == target.size - len(data)
    assert rest.count(0) == len(rest), "bytes past the copied data are not zero"
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(out)])


def test_compare_detects_a_difference(target: Target, tmp_path: Path) -> None:
    """Calibrates the compare above: one changed byte on the export is found."""
    src = tmp_path / "src.img"
    data = random_bytes(2 * MiB, seed=2)
    src.write_bytes(data)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), target.uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), target.uri])
    changed = data[MiB + 1] ^ 0xFF
    run(["qemu-io", "-f", "raw", target.uri, "-c", f"write -P {changed} {MiB + 1} 1"])
    result = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), target.uri],
                 check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert b"mismatch at offset 1048576" in result.stdout  # the 512-byte sector holding it


def test_convert_export_to_export(target: Target, make_export: Callable[[int], Target],
                                  tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = random_bytes(4 * MiB, seed=3)
    src.write_bytes(data)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), target.uri])
    other = make_export(target.size)
    run(["qemu-img", "convert", "-n", "-W", "-f", "raw", "-O", "raw", target.uri, other.uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", target.uri, other.uri])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), other.uri])


def test_map_shows_holes_and_data(target: Target) -> None:
    run(["qemu-io", "-f", "raw", target.uri,
         "-c", "write -P 0xaa 0 4M",
         "-c", "discard 1M 1M",
         "-c", "write -z -u 2M 1M",
         "-c", "write -z 3M 512K",
         "-c", "write -P 0xbb 16M 1M"])
    runs = qemu_img_map(target.uri)
    check_coverage(runs, target.size)
    assert_flags(runs, 0, 1 * MiB, hole=False, zero=False)
    assert_flags(runs, 1 * MiB, 2 * MiB, hole=True, zero=True)  # discarded
    assert_flags(runs, 2 * MiB, 3 * MiB, hole=True, zero=True)  # zeroed with unmap
    # Zeroed without unmap: it must read as zero; allocated or not is the server's choice.
    assert_flags(runs, 3 * MiB, 3 * MiB + 512 * 1024, zero=True)
    assert_flags(runs, 3 * MiB + 512 * 1024, 4 * MiB, hole=False, zero=False)
    assert_flags(runs, 4 * MiB, 16 * MiB, hole=True, zero=True)  # never written
    assert_flags(runs, 16 * MiB, 17 * MiB, hole=False, zero=False)
    assert_flags(runs, 17 * MiB, target.size, hole=True, zero=True)


def test_map_of_fresh_export_is_all_hole(target: Target) -> None:
    runs = qemu_img_map(target.uri)
    check_coverage(runs, target.size)
    assert_flags(runs, 0, target.size, hole=True, zero=True)
