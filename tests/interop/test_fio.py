"""fio's nbd engine against every target: verified random writes at queue depth 16."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Target, need
from tests.interop.support import MiB, run


@pytest.fixture(autouse=True)
def _programs() -> None:
    need("fio", "qemu-io")
    help_text = run(["fio", "--enghelp=nbd"], timeout=30, check=False).stdout
    if b"uri" not in help_text:
        pytest.skip("this fio has no nbd engine")


_runs = itertools.count(1)


def fio(target: Target, tmp_path: Path, *args: str,
        timeout: float = 120) -> tuple[subprocess.CompletedProcess, dict]:
    """Run one fio job file's worth of options; return the process and its JSON report."""
    report = tmp_path / f"fio-{next(_runs)}.json"
    result = run(
        ["fio", "--name=interop", "--ioengine=nbd", f"--uri={target.uri}",
         "--output-format=json", f"--output={report}", "--runtime=90", *args],
        timeout=timeout, check=False, cwd=tmp_path,  # fio leaves verify state files in cwd
    )
    text = report.read_text() if report.exists() else ""
    # fio may put notes before the JSON document.
    data = json.loads(text[text.index("{"):]) if "{" in text else {}
    return result, data


def describe(result: subprocess.CompletedProcess, data: dict) -> str:
    return (f"exit {result.returncode}\nstderr: {result.stderr.decode(errors='replace')}\n"
            f"jobs: {json.dumps(data.get('jobs', []))[:2000]}")


def test_random_write_verified(target: Target, tmp_path: Path) -> None:
    result, data = fio(
        target, tmp_path,
        "--rw=randwrite", "--bs=16k", "--size=16M", "--iodepth=16",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
    )
    assert result.returncode == 0, describe(result, data)
    (job,) = data["jobs"]
    assert job["error"] == 0, describe(result, data)
    assert job["write"]["io_bytes"] == 16 * MiB
    assert job["read"]["io_bytes"] == 16 * MiB, "fio did not read everything back to verify"


def test_two_connections_mixed_block_sizes_verified(target: Target, tmp_path: Path) -> None:
    """Two jobs, so two NBD connections, each writing and verifying its own half."""
    result, data = fio(
        target, tmp_path,
        "--rw=randwrite", "--bsrange=4k-128k", "--size=8M", "--numjobs=2",
        "--offset_increment=8M", "--iodepth=16",
        "--verify=md5", "--do_verify=1", "--verify_fatal=1",
    )
    assert result.returncode == 0, describe(result, data)
    assert len(data["jobs"]) == 2
    for job in data["jobs"]:
        assert job["error"] == 0, describe(result, data)
        assert job["write"]["io_bytes"] == 8 * MiB
        assert job["read"]["io_bytes"] == 8 * MiB


def test_verify_only_passes_then_catches_corruption(target: Target, tmp_path: Path) -> None:
    """Calibrates fio's verification: data that survived reconnecting verifies, a
    block overwritten behind fio's back does not."""
    job = ["--rw=randwrite", "--bs=16k", "--size=4M", "--iodepth=16", "--verify=crc32c",
           "--verify_fatal=1"]
    result, data = fio(target, tmp_path, *job, "--do_verify=0")
    assert result.returncode == 0, describe(result, data)
    assert data["jobs"][0]["write"]["io_bytes"] == 4 * MiB

    result, data = fio(target, tmp_path, *job, "--verify_only")
    assert result.returncode == 0, describe(result, data)
    assert data["jobs"][0]["error"] == 0
    assert data["jobs"][0]["read"]["io_bytes"] == 4 * MiB

    run(["qemu-io", "-f", "raw", target.uri, "-c", "write -P 0x00 1M 16k"])
    result, data = fio(target, tmp_path, *job, "--verify_only")
    assert result.returncode != 0, describe(result, data)
    assert data["jobs"][0]["error"] != 0, describe(result, data)
