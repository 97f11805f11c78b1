"""Helpers for the CLI tests: running `mirrorpool`, short NBD sessions, plain-error checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from urllib.parse import quote

import nbd
import pytest

from tests.helpers.processes import MIRRORPOOL, DeviceProcess


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps output at 80 columns off a terminal; a wide one keeps table cells whole."""
    monkeypatch.setenv("COLUMNS", "250")


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def flat(text: str) -> str:
    """Text with every run of whitespace made one space (rich wraps long lines)."""
    return " ".join(text.split())


def run(*args: str, api: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`mirrorpool ARGS` with MIRRORPOOL_API set to ``api`` (or unset)."""
    env = {k: v for k, v in os.environ.items() if k != "MIRRORPOOL_API"}
    if api is not None:
        env["MIRRORPOOL_API"] = api
    return subprocess.run([MIRRORPOOL, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess, *phrases: str, code: int = 1) -> str:
    """A plain refusal: exit ``code``, the phrases on stderr, no traceback, nothing on stdout."""
    err = flat(result.stderr)
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert err.startswith("error:"), result.stderr
    for phrase in phrases:
        assert phrase in err, (phrase, result.stderr)
    assert result.stdout == ""
    return err


def cli_json(device: DeviceProcess, *args: str) -> object:
    return json.loads(device.cli(*args, "--json").stdout)


# Setting up and checking goes through the API (fast); the CLI runs only for what is tested.


def api_lu(device: DeviceProcess, name: str) -> dict:
    status, body = device.request("GET", f"/v1/lus/{quote(name, safe='')}")
    assert status == 200, (status, body)
    return body  # type: ignore[return-value]


def lu_names(device: DeviceProcess) -> list[str]:
    status, body = device.request("GET", "/v1/lus")
    assert status == 200, (status, body)
    return [lu["name"] for lu in body]  # type: ignore[union-attr]


def api_create(device: DeviceProcess, size: int | str = "1M", pool: int = 0,
               name: str | None = None, **extra: object) -> str:
    name = name or unique()
    status, body = device.request("POST", "/v1/lus",
                                  {"name": name, "size": size, "pool": pool, **extra})
    assert status == 201, (status, body)
    return name


def api_delete(device: DeviceProcess, name: str) -> None:
    status, body = device.request("DELETE", f"/v1/lus/{quote(name, safe='')}?force=true")
    assert status in (204, 404), (status, body)


RECORD_FIELDS = ("name", "uuid", "size", "pool", "backing", "data_path", "created")


def record(lu: dict) -> dict:
    """The fields of an LU that only create/resize/delete change."""
    return {k: lu[k] for k in RECORD_FIELDS}


@contextmanager
def nbd_session(uri: str) -> Iterator[nbd.NBD]:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        yield h
    finally:
        with suppress(nbd.Error):
            h.shutdown()
        del h


def nbd_size(uri: str) -> int:
    """The export size as a brand new client sees it (nbdinfo if present, else libnbd)."""
    if shutil.which("nbdinfo"):
        out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        return int(out.strip())
    with nbd_session(uri) as h:
        return h.get_size()


def wait_until(predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def pattern(length: int, seed: int = 1) -> bytes:
    return bytes((i * 13 + seed) % 251 for i in range(length))


def table_rows(out: str) -> list[list[str]]:
    """Cells of the body rows of a rich table."""
    return [[cell.strip() for cell in line.split("│")[1:-1]]
            for line in out.splitlines() if line.startswith("│")]


def table_header(out: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith("┃"))
    return [cell.strip() for cell in line.split("┃")[1:-1]]
