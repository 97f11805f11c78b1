"""Helpers shared by the backup tests (CLI and interop): triggers, generations, real clients.

Setting up and checking go through the control API or real NBD clients; the CLI runs
only where it is the thing under test.
"""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import nbd

from tests.helpers.processes import DeviceProcess
from tests.interop import rawnbd

KiB = 1 << 10
MiB = 1 << 20
# the device's change-tracking chunk (answered by the diff API as chunk_size)
from mirrorpool.mirror.changes import CHUNK  # noqa: E402

TRIGGER_LU = ".trigger"


def run(cmd: list[str], *, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {result.returncode}\n"
            f"stdout: {result.stdout.decode(errors='replace')}\n"
            f"stderr: {result.stderr.decode(errors='replace')}"
        )
    return result


def qemu_io(target: str, *commands: str, read_only: bool = False) -> str:
    """qemu-io commands in one session on an NBD URI or a raw file; fail on any failure."""
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else []), target]
    for command in commands:
        args += ["-c", command]
    result = run(args, check=False)
    out = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, out
    assert "failed" not in out, out
    return out


def make_reference(path: Path, size: int, *commands: str) -> Path:
    """A sparse raw file of ``size`` bytes with the same qemu-io commands applied."""
    with open(path, "wb") as f:
        f.truncate(size)
    if commands:
        qemu_io(str(path), *commands)
    return path


def identical(a: str, b: str) -> tuple[bool, str]:
    """`qemu-img compare` of two raw images (URIs or files): (equal, what it said)."""
    result = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b], check=False)
    out = (result.stdout + result.stderr).decode(errors="replace").strip()
    assert result.returncode in (0, 1), out  # 2 and up: an error, not an answer
    return result.returncode == 0, out


def assert_identical(a: str, b: str) -> None:
    same, out = identical(a, b)
    assert same, f"{a} and {b} differ: {out}"


def assert_reads_as(uri: str, path: Path) -> None:
    """The export reads exactly as the file, checked by reading both (for exports with many
    small extents, where `qemu-img compare` is slow: it asks block status extent by extent)."""
    h = connect(uri)
    try:
        size = h.get_size()
        assert size == path.stat().st_size, (uri, size, path.stat().st_size)
        step = 4 * MiB
        with open(path, "rb") as f:
            for off in range(0, size, step):
                got = h.pread(min(step, size - off), off)
                want = f.read(min(step, size - off))
                if got != want:
                    first = next(i for i in range(len(want)) if got[i] != want[i])
                    raise AssertionError(f"{uri} differs from {path} at offset {off + first}")
    finally:
        close(h)


# ---------------------------------------------------------------- control API


def api(device: DeviceProcess, method: str, path: str, body: object | None = None,
        expect: int = 200) -> object:
    status, answer = device.request(method, path, body)
    assert status == expect, (method, path, status, answer)
    return answer


def lu_path(name: str) -> str:
    return f"/v1/lus/{quote(name, safe='')}"


def api_trigger(device: DeviceProcess, name: str, label: str = "") -> dict:
    """A trigger through the API; the generation it made."""
    answer = api(device, "POST", f"{lu_path(name)}/trigger", {"label": label})
    (gen,) = answer["generations"]  # type: ignore[index]
    return gen


def generations(device: DeviceProcess, name: str) -> list[dict]:
    return api(device, "GET", f"{lu_path(name)}/backups")  # type: ignore[return-value]


def gen_numbers(device: DeviceProcess, name: str) -> list[int]:
    return [g["gen"] for g in generations(device, name)]


def pin(device: DeviceProcess, name: str, gen: int) -> None:
    api(device, "POST", f"{lu_path(name)}/backups/{gen}/pin")


def mirror(device: DeviceProcess, name: str) -> dict:
    return api(device, "GET", lu_path(name))["mirror"]  # type: ignore[index]


def wait_until(predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)


def wait_in_sync(device: DeviceProcess, name: str, timeout: float = 10) -> dict:
    wait_until(lambda: mirror(device, name)["active_state"] == "in-sync", timeout,
               f"the active backup of {name} to be in sync")
    return mirror(device, name)


def wait_ready(device: DeviceProcess, name: str, gen: int, timeout: float = 10) -> None:
    """Until generation ``gen`` has its own copy complete (no longer reads the primary)."""
    def ready() -> bool:
        return any(g["gen"] == gen and g["state"] == "ready" for g in generations(device, name))
    wait_until(ready, timeout, f"{name}@{gen} to be ready")


def wait_no_readers(device: DeviceProcess, name: str, timeout: float = 10) -> None:
    wait_until(lambda: all(g["readers"] == 0 for g in generations(device, name)), timeout,
               f"the generation exports of {name} to be closed")


# ---------------------------------------------------------------- NBD


def connect(uri: str, *contexts: str) -> nbd.NBD:
    h = nbd.NBD()
    # a URI's ?tls-certificates=DIR is a local file: the tests' own certificates
    h.set_uri_allow_local_file(True)
    for ctx in contexts:
        h.add_meta_context(ctx)
    h.connect_uri(uri)
    return h


def close(h: nbd.NBD) -> None:
    with contextlib.suppress(nbd.Error):
        h.shutdown()


def read_export(uri: str) -> bytes:
    h = connect(uri)
    try:
        size = h.get_size()
        out = bytearray()
        step = 4 * MiB
        for off in range(0, size, step):
            out += h.pread(min(step, size - off), off)
        return bytes(out)
    finally:
        close(h)


def trigger_record(*names: str, label: str = "") -> bytes:
    text = "MPTRIGGER 1\n" + "".join(f"lu {n}\n" for n in names)
    if label:
        text += f"label {label}\n"
    raw = text.encode()
    return raw + bytes(-len(raw) % 512)


def nul_json(raw: bytes | bytearray) -> dict:
    """A JSON answer read back from a trigger export (NUL-padded)."""
    return json.loads(bytes(raw).rstrip(b"\0"))


def trigger_lu(device: DeviceProcess, *names: str, label: str = "") -> dict:
    """Mechanism 1: a trigger record written to the trigger LU; its answer read back."""
    h = connect(device.uri(TRIGGER_LU))
    try:
        h.pwrite(trigger_record(*names, label=label), 0)
        return nul_json(h.pread(4096, 0))
    finally:
        close(h)


def trigger_path(device: DeviceProcess, name: str, label: str = "") -> dict:
    """Mechanism 2: a write to NAME:trigger; its answer read back."""
    h = connect(device.uri(f"{name}:trigger"))
    try:
        payload = label.encode()
        h.pwrite(payload + bytes(512 - len(payload) % 512), 0)
        return nul_json(h.pread(4096, 0))
    finally:
        close(h)


def changed_runs(uri: str, context: str) -> list[tuple[int, int, int]]:
    """`nbdinfo --map=CONTEXT --json` as (offset, length, flags)."""
    out = run(["nbdinfo", f"--map={context}", "--json", uri], timeout=30).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def flagged(runs: list[tuple[int, int, int]], flag: int = 1) -> list[tuple[int, int]]:
    """(offset, length) of the runs with ``flag``, adjacent ones merged."""
    out: list[tuple[int, int]] = []
    for off, length, flags in runs:
        if flags & flag:
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((off, length))
    return out


def chunk_ranges(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Byte ranges widened to whole change-tracking chunks, merged, clipped to ``size``."""
    chunks = sorted({c for off, n in ranges
                     for c in range(off // CHUNK, (off + n - 1) // CHUNK + 1)})
    out: list[tuple[int, int]] = []
    for c in chunks:
        start, end = c * CHUNK, min((c + 1) * CHUNK, size)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))
    return out


# ---------------------------------------------------------------- raw, pipelined NBD

TRIGGER_CMD = 0x4D50  # NBD_CMD of the mirrorpool TRIGGER extension
REPLY_TRIGGER = 0x4D50  # its reply chunk type: the JSON answer


def request(cookie: int, typ: int, offset: int, data: bytes = b"",
            length: int | None = None, flags: int = 0) -> bytes:
    """One NBD request (header and payload), to be sent back to back with others."""
    n = len(data) if length is None else length
    return struct.pack(">IHHQQI", rawnbd.REQUEST_MAGIC, flags, typ, cookie, offset, n) + data


def read_reply(conn: rawnbd.RawNbd) -> tuple[int, int, bytes]:
    """The next reply, simple or a structured chunk: (cookie, error, trigger JSON or b'')."""
    (magic,) = struct.unpack(">I", conn.recv_exact(4))
    if magic == rawnbd.SIMPLE_REPLY_MAGIC:
        error, cookie = struct.unpack(">IQ", conn.recv_exact(12))
        return cookie, error, b""
    assert magic == rawnbd.STRUCTURED_REPLY_MAGIC, hex(magic)
    flags, typ, cookie, length = struct.unpack(">HHQI", conn.recv_exact(16))
    body = conn.recv_exact(length)
    assert flags & rawnbd.REPLY_FLAG_DONE, "a one-chunk reply was expected"
    if typ & 0x8000:
        return cookie, struct.unpack(">I", body[:4])[0], body
    assert typ == REPLY_TRIGGER, typ
    return cookie, 0, body


# ---------------------------------------------------------------- replication


def link_status(a: DeviceProcess, name: str) -> dict:
    return api(a, "GET", f"{lu_path(name)}/remote")  # type: ignore[return-value]


def wait_caught_up(a: DeviceProcess, name: str, timeout: float = 30) -> dict:
    def done() -> bool:
        s = link_status(a, name)
        return (s["state"] == "consistent" and s["connected"] and s["lag_seq"] == 0
                and s["acked_seq"] >= s["replied_seq"] and s["journal_used"] == 0)

    wait_until(done, timeout, "the remote copy to catch up")
    return link_status(a, name)


def remote_gens(a: DeviceProcess, name: str) -> list[dict]:
    return api(a, "GET", f"{lu_path(name)}/remote/backups")  # type: ignore[return-value]


def assert_same_cut(a: DeviceProcess, b: DeviceProcess, name: str) -> int:
    """Every trigger with a generation on both sides: both read the same."""
    pairs = [(r["gen"], r["remote_gen"]) for r in remote_gens(a, name)
             if r["gen"] is not None and r["remote_gen"] is not None]
    for gen, remote_gen in pairs:
        assert_identical(a.uri(f"{name}@{gen}"), b.uri(f"{name}@{remote_gen}"))
    return len(pairs)
