"""`mirrorpool serve`: start-up, clean stops on signals, refusals, Unix socket, restarts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbd
import pytest

from tests.cli.conftest import (
    RECORD_FIELDS,
    api_create,
    api_lu,
    flat,
    nbd_session,
    nbd_size,
    pattern,
    unique,
    wait_until,
)
from tests.helpers.processes import MIRRORPOOL, DeviceProcess, free_port, wait_for_port
from tests.helpers.tls import Certificates, make_certificates

MIB = 1 << 20


@contextmanager
def listening_socket() -> Iterator[int]:
    """A loopback port that something else already listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def serve_refused(data: Path, nbd_port: int, api_port: int, *extra: str,
                  env: dict[str, str] | None = None) -> str:
    """Run `mirrorpool serve` that must refuse to start; its stderr, whitespace made flat."""
    result = subprocess.run(
        [MIRRORPOOL, "serve", "--data", str(data), "--listen", f"127.0.0.1:{nbd_port}",
         "--api", f"127.0.0.1:{api_port}", *extra],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode != 0, result.stderr
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    return flat(result.stderr)


def start(device: DeviceProcess) -> DeviceProcess:
    """Start, and wait until the device says it serves (its signal handlers are set by then).

    DeviceProcess.start returns as soon as the ports accept, which is before; see
    test_sigterm_right_after_the_ports_open.
    """
    seen = device.log_text().count("serving control API")
    device.start()
    wait_until(lambda: device.log_text().count("serving control API") > seen, 30,
               "the device to log its addresses")
    return device


def assert_clean_stop(device: DeviceProcess, signame: str) -> None:
    log = device.log_text()
    assert f"signal received signal={signame}" in log
    assert log.rstrip().splitlines()[-1].endswith("mirrorpool.serve: stopped"), log[-2000:]
    assert "Traceback" not in log, log
    assert " error " not in log and " critical " not in log, log


# ---------------------------------------------------------------- starting and stopping


def test_starts_with_only_ports_and_data_dir_and_logs_addresses(
    fresh_device: DeviceProcess,
) -> None:
    assert not fresh_device.data_dir.exists()
    start(fresh_device)
    log = fresh_device.log_text()
    assert f"serving NBD address=nbd://127.0.0.1:{fresh_device.nbd_port}" in log
    assert f"serving control API address=http://127.0.0.1:{fresh_device.api_port}" in log
    assert f"http://127.0.0.1:{fresh_device.api_port}/openapi.json" in log
    assert fresh_device.data_dir.is_dir()
    status, body = fresh_device.request("GET", "/v1/status")
    assert status == 200
    assert body["lus"] == [] and body["data_dir"] == str(fresh_device.data_dir)  # type: ignore
    # the data directory records who holds it
    lock = (fresh_device.data_dir / "device.lock").read_text().strip()
    assert lock == str(fresh_device.proc.pid)  # type: ignore[union-attr]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stops_cleanly_on_signal(fresh_device: DeviceProcess, sig: signal.Signals) -> None:
    start(fresh_device)
    name = api_create(fresh_device, "1M")
    with nbd_session(fresh_device.uri(name)) as h:
        h.pwrite(b"x" * 512, 0)  # an idle client stays connected through the stop
        assert fresh_device.stop(sig) == 0
        with pytest.raises(nbd.Error):
            h.pread(512, 0)
    assert_clean_stop(fresh_device, sig.name)
    for port in (fresh_device.nbd_port, fresh_device.api_port):
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
    # a clean stop leaves the data directory free for the next device
    start(fresh_device)
    assert "not stopped cleanly" not in fresh_device.log_text()
    assert fresh_device.stop() == 0


def test_sigterm_while_a_client_writes(fresh_device: DeviceProcess) -> None:
    start(fresh_device)
    name = api_create(fresh_device, "8M")
    flushed = pattern(MIB, seed=7)
    h = nbd.NBD()
    h.connect_uri(fresh_device.uri(name))
    h.pwrite(flushed, 0)
    h.flush()

    errors: list[BaseException] = []
    writes = 0
    writing = threading.Event()

    def writer() -> None:
        nonlocal writes
        block = b"\xcd" * 65536
        try:
            while True:
                h.pwrite(block, MIB + (writes % 100) * 65536)
                writes += 1
                writing.set()
        except nbd.Error as exc:
            errors.append(exc)
        finally:
            writing.set()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    assert writing.wait(20)
    assert fresh_device.stop(signal.SIGTERM) == 0
    t.join(20)
    assert not t.is_alive()
    assert errors and writes > 0  # the server ended the connection under the writer
    assert_clean_stop(fresh_device, "SIGTERM")

    start(fresh_device)
    with nbd_session(fresh_device.uri(name)) as h2:
        assert h2.pread(MIB, 0) == flushed
        # a clean stop keeps every write that was acknowledged, flushed or not
        for i in range(min(writes, 100)):
            assert h2.pread(65536, MIB + i * 65536) == b"\xcd" * 65536, i
    assert "not stopped cleanly" not in fresh_device.log_text()


def test_sigterm_right_after_the_ports_open(tmp_path: Path) -> None:
    # what a service manager or a test harness does: wait for the port, then stop
    codes = []
    for _ in range(3):
        dev = DeviceProcess(data_dir=tmp_path / "data")
        try:
            dev.start()
        finally:
            if dev.proc is not None:
                codes.append(dev.stop(signal.SIGTERM))
    assert codes == [0, 0, 0], (codes, dev.log_text()[-1500:])
    assert "not stopped cleanly" not in dev.log_text()


# ---------------------------------------------------------------- refusing to start


def test_refuses_when_the_nbd_port_is_taken(tmp_path: Path) -> None:
    api_port = free_port()
    with listening_socket() as port:
        err = serve_refused(tmp_path / "data", port, api_port)
    assert f"cannot listen for NBD on 127.0.0.1:{port}" in err
    assert "Address already in use" in err
    # nothing was left behind: the API port is free, the data dir is not held
    with socket.socket() as s:
        s.bind(("127.0.0.1", api_port))
    dev = start(DeviceProcess(data_dir=tmp_path / "data", api_port=api_port))
    assert dev.stop() == 0


def test_refuses_when_the_api_port_is_taken(tmp_path: Path) -> None:
    nbd_port = free_port()
    with listening_socket() as port:
        err = serve_refused(tmp_path / "data", nbd_port, port)
    assert f"cannot listen for the control API on 127.0.0.1:{port}" in err
    assert "Address already in use" in err
    # the NBD listener it had opened was closed again
    with socket.socket() as s:
        s.bind(("127.0.0.1", nbd_port))


def test_refuses_a_data_dir_held_by_a_running_device(
    fresh_device: DeviceProcess, tmp_path: Path
) -> None:
    start(fresh_device)
    name = api_create(fresh_device, "1M")
    err = serve_refused(fresh_device.data_dir, free_port(), free_port())
    assert f"data directory {fresh_device.data_dir} is in use by a running device" in err
    assert f"pid {fresh_device.proc.pid}" in err  # type: ignore[union-attr]
    # the running device is unharmed, and still holds the directory
    assert api_lu(fresh_device, name)["size"] == MIB
    assert nbd_size(fresh_device.uri(name)) == MIB
    serve_refused(fresh_device.data_dir, free_port(), free_port())
    assert fresh_device.stop() == 0


@pytest.mark.parametrize(("option", "value"), [("--listen", "nonsense"),
                                               ("--api", "127.0.0.1:99999")])
def test_refuses_a_malformed_address(tmp_path: Path, option: str, value: str) -> None:
    result = subprocess.run(
        [MIRRORPOOL, "serve", "--data", str(tmp_path / "data"), option, value],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2  # a usage error
    assert "HOST:PORT" in flat(result.stderr)
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- TLS settings


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tls", "on"], "--tls on needs both --tls-cert and --tls-key"),
        (["--tls-cert", "{good}/server-cert.pem"],
         "--tls require needs both --tls-cert and --tls-key"),
        (["--tls-key", "{good}/server-key.pem"], "--tls-key and --tls-ca need --tls-cert"),
        (["--tls-cert", "{good}/missing.pem", "--tls-key", "{good}/server-key.pem"],
         "TLS certificate {good}/missing.pem does not exist"),
        (["--tls-cert", "{good}/server-cert.pem", "--tls-key", "{good}"],
         "TLS key {good} does not exist or is not a file"),
        (["--tls-cert", "{good}/server-cert.pem", "--tls-key", "{good}/client-key.pem"],
         "cannot use TLS certificate {good}/server-cert.pem with key {good}/client-key.pem"),
        (["--tls-cert", "{good}/ca-cert.pem", "--tls-key", "{good}/ca-cert.pem"],
         "cannot use TLS certificate {good}/ca-cert.pem"),
        (["--tls-cert", "{good}/server-cert.pem", "--tls-key", "{good}/server-key.pem",
          "--tls-ca", "{good}/server-key.pem"], "cannot use TLS CA certificate"),
    ],
    ids=["on-without-cert", "cert-without-key", "key-without-cert", "missing-cert",
         "key-is-a-directory", "key-of-another-cert", "no-key-in-file", "ca-not-a-cert"],
)
def test_refuses_tls_settings_it_cannot_use(
    tmp_path: Path, certs: Certificates, args: list[str], expected: str
) -> None:
    good = str(certs.good)
    err = serve_refused(tmp_path / "data", free_port(), free_port(),
                        *(a.format(good=good) for a in args))
    assert expected.format(good=good) in err, err
    assert not (tmp_path / "data").exists()  # refused before the device was opened


def test_refuses_an_unknown_tls_mode(tmp_path: Path) -> None:
    result = subprocess.run([MIRRORPOOL, "serve", "--data", str(tmp_path / "d"), "--tls", "yes"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--tls" in flat(result.stderr) and "Traceback" not in result.stderr


def test_tls_comes_from_the_environment(
    tmp_path: Path, certs: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**os.environ, "MIRRORPOOL_TLS": "on"}
    err = serve_refused(tmp_path / "data", free_port(), free_port(), env=env)
    assert "--tls on needs both --tls-cert and --tls-key" in err
    # a certificate alone makes TLS required (DeviceProcess passes the environment on)
    monkeypatch.setenv("MIRRORPOOL_TLS_CERT", str(certs.good / "server-cert.pem"))
    monkeypatch.setenv("MIRRORPOOL_TLS_KEY", str(certs.good / "server-key.pem"))
    monkeypatch.setenv("MIRRORPOOL_TLS_CA", str(certs.good / "ca-cert.pem"))
    dev = DeviceProcess(data_dir=tmp_path / "data")
    try:
        start(dev)
        log = dev.log_text()
        assert f"serving NBD address=nbds://127.0.0.1:{dev.nbd_port}" in log
        assert "NBD TLS required tls=require client_certificates=required" in log
        status, body = dev.request("GET", "/v1/status")
        assert status == 200
        assert body["nbd"] == [f"nbds://127.0.0.1:{dev.nbd_port}"]  # type: ignore[index]
    finally:
        assert dev.stop() == 0


def test_logs_that_tls_is_off(fresh_device: DeviceProcess) -> None:
    start(fresh_device)
    assert "NBD TLS off" in fresh_device.log_text()
    assert fresh_device.stop() == 0


# ---------------------------------------------------------------- Unix socket


def test_unix_socket_serves_nbd(fresh_device: DeviceProcess, tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    fresh_device.unix_socket = sock
    start(fresh_device)
    assert f"serving NBD address=nbd+unix:///?socket={sock}" in fresh_device.log_text()
    name = api_create(fresh_device, "2M")
    unix_uri = f"nbd+unix:///{name}?socket={sock}"
    assert nbd_size(unix_uri) == 2 * MIB
    with nbd_session(unix_uri) as h:
        h.pwrite(b"\x77" * 4096, 8192)
        h.flush()
    with nbd_session(fresh_device.uri(name)) as h:  # one LU behind both listeners
        assert h.pread(4096, 8192) == b"\x77" * 4096
    status, body = fresh_device.request("GET", "/v1/status")
    assert f"nbd+unix:///?socket={sock}" in body["nbd"]  # type: ignore[index]
    assert fresh_device.stop() == 0
    assert not sock.exists()  # removed on a clean stop


def test_unix_socket_in_use_by_another_server_is_refused(
    fresh_device: DeviceProcess, tmp_path: Path
) -> None:
    sock = tmp_path / "nbd.sock"
    fresh_device.unix_socket = sock
    start(fresh_device)
    err = serve_refused(tmp_path / "other", free_port(), free_port(), "--unix", str(sock))
    assert f"cannot listen on {sock}" in err and "another server" in err
    assert sock.exists()
    assert fresh_device.stop() == 0


# ---------------------------------------------------------------- restarts


def lus_by_name(device: DeviceProcess) -> dict[str, dict]:
    status, body = device.request("GET", "/v1/lus")
    assert status == 200
    return {lu["name"]: {k: lu[k] for k in RECORD_FIELDS} for lu in body}  # type: ignore


def test_lus_and_data_survive_a_restart(fresh_device: DeviceProcess, tmp_path: Path) -> None:
    start(fresh_device)
    backing = tmp_path / "backing.img"
    backing.write_bytes(bytes(MIB))
    plain = api_create(fresh_device, "4M", pool=0)
    mirrored = api_create(fresh_device, "2M", pool=2)
    external = unique()
    api_create(fresh_device, None, pool=1, name=external,  # type: ignore[arg-type]
               backing=str(backing))
    grown = api_create(fresh_device, "1M", pool=0)
    assert fresh_device.request("POST", f"/v1/lus/{grown}/resize", {"size": "3M"})[0] == 200
    data = {plain: pattern(MIB, 1), mirrored: pattern(MIB, 2), external: pattern(MIB, 3),
            grown: pattern(MIB, 4)}
    offsets = {plain: 3 * MIB, mirrored: 4096, external: 0, grown: 2 * MIB}
    for name, payload in data.items():
        with nbd_session(fresh_device.uri(name)) as h:
            h.pwrite(payload, offsets[name])
            h.flush()
    before = lus_by_name(fresh_device)
    assert fresh_device.stop() == 0

    start(fresh_device)
    after = lus_by_name(fresh_device)
    assert after == before
    assert (after[plain]["size"], after[mirrored]["pool"], after[grown]["size"]) == (
        4 * MIB, 2, 3 * MIB)
    assert after[external]["backing"] == str(backing)
    for name, payload in data.items():
        with nbd_session(fresh_device.uri(name)) as h:
            assert h.get_size() == before[name]["size"]
            assert h.pread(len(payload), offsets[name]) == payload, name
    assert "not stopped cleanly" not in fresh_device.log_text()


def test_flushed_data_survives_sigkill(fresh_device: DeviceProcess, tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    fresh_device.unix_socket = sock
    start(fresh_device)
    plain = api_create(fresh_device, "4M", pool=0)
    mirrored = api_create(fresh_device, "4M", pool=1)
    payload = pattern(2 * MIB, 9)
    for name in (plain, mirrored):
        with nbd_session(fresh_device.uri(name)) as h:
            h.pwrite(payload, MIB)
            h.flush()
    before = lus_by_name(fresh_device)
    assert fresh_device.stop(signal.SIGKILL) == -signal.SIGKILL
    assert sock.exists()  # left behind by the killed device

    start(fresh_device)  # a stale socket and a dead holder's lock do not block
    assert lus_by_name(fresh_device) == before
    for name in (plain, mirrored):
        with nbd_session(fresh_device.uri(name)) as h:
            assert h.pread(2 * MIB, MIB) == payload
            assert h.pread(4096, 0) == bytes(4096)
    with nbd_session(f"nbd+unix:///{plain}?socket={sock}") as h:
        assert h.pread(4096, MIB) == payload[:4096]
    assert "not stopped cleanly" in fresh_device.log_text()
    lock = (fresh_device.data_dir / "device.lock").read_text().strip()
    assert lock == str(fresh_device.proc.pid)  # type: ignore[union-attr]
    assert fresh_device.stop() == 0


def test_created_lu_survives_sigkill_right_away(fresh_device: DeviceProcess) -> None:
    start(fresh_device)
    name = api_create(fresh_device, "2M", pool=0)
    before = lus_by_name(fresh_device)
    fresh_device.stop(signal.SIGKILL)
    start(fresh_device)
    assert lus_by_name(fresh_device) == before
    assert nbd_size(fresh_device.uri(name)) == 2 * MIB


def test_environment_configures_serve(tmp_path: Path) -> None:
    nbd_port, api_port = free_port(), free_port()
    env = {**os.environ, "MIRRORPOOL_DATA": str(tmp_path / "envdata"),
           "MIRRORPOOL_LISTEN": f"127.0.0.1:{nbd_port}",
           "MIRRORPOOL_API_LISTEN": f"127.0.0.1:{api_port}"}
    env.pop("MIRRORPOOL_API", None)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([MIRRORPOOL, "serve"], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=tmp_path)
    log.close()
    dev = DeviceProcess(data_dir=tmp_path / "envdata", nbd_port=nbd_port, api_port=api_port,
                        proc=proc, log_path=tmp_path / "serve.log")
    try:
        wait_for_port(api_port, proc)
        wait_for_port(nbd_port, proc)
        wait_until(lambda: "serving control API" in dev.log_text(), 30)
        name = api_create(dev, "1M")
        assert nbd_size(dev.uri(name)) == MIB
        assert (tmp_path / "envdata" / "catalog.sqlite").exists()
        assert not (tmp_path / "mirrorpool-data").exists()
    finally:
        assert dev.stop() == 0
