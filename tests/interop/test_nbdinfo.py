"""nbdinfo against every target: JSON facts, --can/--is exit codes, --map, --list."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.conftest import Target, need
from tests.helpers.processes import DeviceProcess
from tests.interop.support import (
    KiB,
    MiB,
    assert_flags,
    check_coverage,
    lu_name,
    nbdinfo_map,
    run,
)


@pytest.fixture(autouse=True)
def _programs() -> None:
    need("nbdinfo", "qemu-io")


def nbdinfo_json(uri: str) -> dict:
    return json.loads(run(["nbdinfo", "--json", uri], timeout=30).stdout)


def test_json_describes_the_export(target: Target) -> None:
    info = nbdinfo_json(target.uri)
    assert info["protocol"] == "newstyle-fixed"
    assert info["TLS"] is False
    assert info["structured"] is True
    assert len(info["exports"]) == 1
    export = info["exports"][0]
    assert export["export-size"] == target.size
    expected_name = lu_name(target) if target.kind == "mirrorpool" else ""
    assert export["export-name"] == expected_name
    assert export["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn",
                 "can_cache", "can_df", "can_fast_zero"):
        assert export[flag] is True, flag
    assert "base:allocation" in export["contexts"]


def test_json_block_sizes_are_consistent(target: Target) -> None:
    """If a server advertises block sizes they must be powers of two, min <= pref <= max."""
    export = nbdinfo_json(target.uri)["exports"][0]
    keys = ("block_size_minimum", "block_size_preferred", "block_size_maximum")
    present = [k for k in keys if k in export]
    if target.kind == "mirrorpool":
        assert present == list(keys), export  # mirrorpool sends NBD_INFO_BLOCK_SIZE
    if not present:
        return
    minimum, preferred, maximum = (export[k] for k in keys)
    for value in (minimum, preferred):
        assert value > 0 and value & (value - 1) == 0, export
    assert minimum <= preferred <= maximum, export
    assert minimum <= 64 * KiB and preferred <= 32 * MiB, export
    assert maximum >= preferred, export


def test_size(target: Target) -> None:
    out = run(["nbdinfo", "--size", target.uri], timeout=30).stdout
    assert int(out.strip()) == target.size


def test_size_of_an_unaligned_export(target: Target,
                                     make_export: Callable[[int], Target]) -> None:
    odd = make_export(3 * MiB + 512)
    assert int(run(["nbdinfo", "--size", odd.uri], timeout=30).stdout) == 3 * MiB + 512
    runs = nbdinfo_map(odd.uri)
    check_coverage(runs, 3 * MiB + 512)


CAN_FLAGS = ("connect", "read", "write", "flush", "fua", "trim", "zero", "fast-zero",
             "multi-conn", "cache", "df", "structured-reply")


def test_can_exit_status_says_yes(target: Target) -> None:
    answers = {
        flag: run(["nbdinfo", "--can", flag, target.uri], timeout=30, check=False)
        for flag in CAN_FLAGS
    }
    assert {flag: r.returncode for flag, r in answers.items()} == dict.fromkeys(CAN_FLAGS, 0)
    assert all(r.stdout == b"" for r in answers.values())


def test_is_exit_status_says_no(target: Target) -> None:
    """Exit 2 is nbdinfo's 'false'; this also proves --can/--is can answer no."""
    codes = {
        flag: run(["nbdinfo", "--is", flag, target.uri], timeout=30, check=False).returncode
        for flag in ("read-only", "rotational")
    }
    assert codes == {"read-only": 2, "rotational": 2}


def test_can_agrees_with_json(target: Target) -> None:
    export = nbdinfo_json(target.uri)["exports"][0]
    for flag in ("flush", "fua", "trim", "zero", "multi-conn"):
        code = run(["nbdinfo", "--can", flag, target.uri], timeout=30, check=False).returncode
        assert code in (0, 2), flag
        assert (code == 0) == export["can_" + flag.replace("-", "_")], flag


def test_map_of_fresh_export_is_one_hole(target: Target) -> None:
    runs = nbdinfo_map(target.uri)
    check_coverage(runs, target.size)
    assert_flags(runs, 0, target.size, hole=True, zero=True)


def test_map_shows_data_where_written_and_holes_elsewhere(target: Target) -> None:
    run(["qemu-io", "-f", "raw", target.uri,
         "-c", "write -P 0x21 1M 2M",
         "-c", "write -P 0x22 8M 1M",
         "-c", "write -P 0x23 62M 2M",
         "-c", "discard 2M 1M",
         "-c", "write -z -u 8M 1M",
         "-c", "write -P 0x24 32M 4k"])
    runs = nbdinfo_map(target.uri)
    check_coverage(runs, target.size)
    assert_flags(runs, 0, 1 * MiB, hole=True, zero=True)
    assert_flags(runs, 1 * MiB, 2 * MiB, hole=False, zero=False)
    assert_flags(runs, 2 * MiB, 8 * MiB, hole=True, zero=True)
    assert_flags(runs, 8 * MiB, 9 * MiB, hole=True, zero=True)
    assert_flags(runs, 9 * MiB, 32 * MiB, hole=True, zero=True)
    assert_flags(runs, 32 * MiB, 32 * MiB + 4 * KiB, hole=False, zero=False)
    # The map granularity is the server's (nbdkit memory uses 32K pages).
    assert_flags(runs, 33 * MiB, 62 * MiB, hole=True, zero=True)
    assert_flags(runs, 62 * MiB, 64 * MiB, hole=False, zero=False)


def test_map_totals(target: Target) -> None:
    run(["qemu-io", "-f", "raw", target.uri, "-c", "write -P 0x31 4M 4M"])
    out = json.loads(run(["nbdinfo", "--map", "--totals", "--json", target.uri]).stdout)
    by_type = {entry["type"]: entry["size"] for entry in out}
    assert by_type.get(0) == 4 * MiB, out
    assert by_type.get(3) == target.size - 4 * MiB, out


def test_list_on_mirrorpool_shows_every_lu(target: Target, device: DeviceProcess,
                                           make_export: Callable[[int], Target]) -> None:
    if target.kind != "mirrorpool":
        pytest.skip("only mirrorpool has one export per LU")
    extra = make_export(8 * MiB)
    extra_name = extra.uri.rsplit("/", 1)[1]
    lus = {lu["name"]: lu["size"]
           for lu in json.loads(device.cli("lu", "list", "--json").stdout)}
    listed = json.loads(run(["nbdinfo", "--list", "--json", target.uri]).stdout)["exports"]
    sizes = {e["export-name"]: e["export-size"] for e in listed}
    # Every LU is listed with its size ...
    assert {name: sizes.get(name) for name in lus} == lus
    assert sizes[lu_name(target)] == target.size
    assert sizes[extra_name] == 8 * MiB
    # ... and nothing else but the device's own special exports: the trigger LU
    # and read-only generations (NAME@GEN) of listed LUs.
    for name in set(sizes) - set(lus):
        assert name == ".trigger" or name.split("@", 1)[0] in lus, name
    for e in listed:
        assert e["uri"].endswith("/" + e["export-name"]), e


def test_list_on_mirrorpool_drops_deleted_lu(target: Target, device: DeviceProcess) -> None:
    if target.kind != "mirrorpool":
        pytest.skip("only mirrorpool has LUs to delete")
    name = device.create_lu("4M", pool=0)
    listed = json.loads(run(["nbdinfo", "--list", "--json", target.uri]).stdout)["exports"]
    assert name in {e["export-name"] for e in listed}
    device.cli("lu", "delete", name, "--force")
    listed = json.loads(run(["nbdinfo", "--list", "--json", target.uri]).stdout)["exports"]
    names = {e["export-name"] for e in listed}
    assert name not in names
    assert lu_name(target) in names
    result = run(["nbdinfo", "--can", "connect", device.uri(name)], timeout=30, check=False)
    assert result.returncode != 0


def test_list_on_nbdkit_shows_its_one_export(target: Target) -> None:
    if target.kind != "nbdkit":
        pytest.skip("nbdkit memory serves exactly one export")
    listed = json.loads(run(["nbdinfo", "--list", "--json", target.uri]).stdout)["exports"]
    assert [(e["export-name"], e["export-size"]) for e in listed] == [("", target.size)]


def test_unknown_export_is_refused(target: Target) -> None:
    if target.kind == "nbdkit":
        pytest.skip("nbdkit memory serves any export name")
    base = target.uri.rsplit("/", 1)[0]
    result = run(["nbdinfo", "--size", base + "/no-such-lu"], timeout=30, check=False)
    assert result.returncode == 1
    assert b"no-such-lu" in result.stderr
