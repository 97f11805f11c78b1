"""NBD over TLS (NBD_OPT_STARTTLS) with real peers: nbdinfo, libnbd, qemu, our own client.

Every test runs against a mirrorpool device and, as the calibration, against
nbdkit given the same certificates: where both agree, the test says what TLS
in NBD is, not what mirrorpool happens to do.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from mirrorpool.nbd.client import NbdClient, NbdError
from mirrorpool.nbd.tls import client_tls_context
from tests.conftest import need
from tests.helpers.processes import DeviceProcess, NbdkitProcess
from tests.helpers.tls import Certificates, make_certificates
from tests.interop.rawnbd import (
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_LIST,
    REP_ACK,
    RawNbd,
    go_data,
)
from tests.interop.support import MiB, random_bytes, run, wait_until

try:
    import nbd
except ImportError:  # python3-libnbd is a Debian package, not a wheel
    if os.environ.get("CI"):
        raise
    pytest.skip("the nbd module (python3-libnbd) is not installed", allow_module_level=True)

SIZE = 64 * MiB
EXPORT = "lu"
OPT_STARTTLS = 5
REP_ERR_INVALID = 2**31 + 3
REP_ERR_TLS_REQD = 2**31 + 5


@dataclass
class TlsServer:
    kind: str
    port: int
    device: DeviceProcess | None = None

    def uri(self, certificates: Path | None = None, scheme: str = "nbds") -> str:
        uri = f"{scheme}://127.0.0.1:{self.port}/{EXPORT}"
        return f"{uri}?tls-certificates={certificates}" if certificates else uri

    def handshake_failures(self) -> int:
        return self.device.log_text().count("TLS handshake failed") if self.device else 0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    need("openssl")
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _start(kind: str, certs: Certificates, root: Path, *, verify_clients: bool,
           mode: str = "require") -> Iterator[TlsServer]:
    if kind == "mirrorpool":
        args = ["--tls", mode, "--tls-cert", certs.file("server-cert.pem"),
                "--tls-key", certs.file("server-key.pem")]
        if verify_clients:
            args += ["--tls-ca", certs.file("ca-cert.pem")]
        dev = DeviceProcess(data_dir=root / "data", extra_args=args).start()
        wait_until(lambda: "serving control API" in dev.log_text(), 30, "the device to start")
        dev.create_lu("64M", name=EXPORT)
        yield TlsServer(kind, dev.nbd_port, dev)
        dev.stop()
    else:
        need("nbdkit")
        args = [f"--tls={mode}", f"--tls-certificates={certs.good}"]
        if verify_clients:
            args.append("--tls-verify-peer")
        kit = NbdkitProcess([*args, "memory", str(SIZE)]).start()
        yield TlsServer(kind, kit.port)
        kit.stop()


@pytest.fixture(scope="module", params=["mirrorpool", "nbdkit"])
def server(request: pytest.FixtureRequest, certs: Certificates,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """TLS required, any client (with or without a certificate) let in."""
    root = tmp_path_factory.mktemp("tls")
    yield from _start(request.param, certs, root, verify_clients=False)


@pytest.fixture(scope="module", params=["mirrorpool", "nbdkit"])
def mtls_server(request: pytest.FixtureRequest, certs: Certificates,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """TLS required, and a client certificate signed by the test CA."""
    root = tmp_path_factory.mktemp("mtls")
    yield from _start(request.param, certs, root, verify_clients=True)


def libnbd_handle(server: TlsServer, certificates: Path | None,
                  tls: int = nbd.TLS_REQUIRE) -> nbd.NBD:
    h = nbd.NBD()
    h.set_tls(tls)
    if certificates is not None:
        h.set_tls_certificates(str(certificates))
    h.connect_uri(server.uri(scheme="nbds" if tls == nbd.TLS_REQUIRE else "nbd"))
    return h


def round_trip(h: nbd.NBD, offset: int, seed: int) -> None:
    data = random_bytes(MiB, seed)
    h.pwrite(data, offset)
    h.flush()
    assert h.pread(MiB, offset) == data


# ---------------------------------------------------------------- TLS required


def test_nbdinfo_over_nbds(server: TlsServer, certs: Certificates) -> None:
    need("nbdinfo")
    out = json.loads(run(["nbdinfo", "--json", server.uri(certs.good)], timeout=30).stdout)
    assert out["TLS"] is True
    [export] = out["exports"]
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is False


def test_libnbd_writes_and_reads_back_over_tls(server: TlsServer, certs: Certificates) -> None:
    h = libnbd_handle(server, certs.good)
    try:
        assert h.get_tls_negotiated()
        assert h.get_size() == SIZE
        round_trip(h, 3 * MiB, seed=1)
        # a large read reply is sent in several TLS writes, between which the reader may run
        assert h.pread(8 * MiB, 0)[3 * MiB : 4 * MiB] == random_bytes(MiB, 1)
    finally:
        h.shutdown()


def test_qemu_writes_a_pattern_and_reads_it_back(server: TlsServer, certs: Certificates) -> None:
    need("qemu-io", "qemu-img")
    creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={certs.good}"
    image = f"driver=nbd,host=127.0.0.1,port={server.port},export={EXPORT},tls-creds=tls0"
    info = run(["qemu-img", "info", "--output=json", "--object", creds, "--image-opts", image],
               timeout=30).stdout
    assert json.loads(info)["virtual-size"] == SIZE
    out = run(["qemu-io", "--object", creds, "--image-opts", image,
               "-c", "write -P 0x5a 5M 1M", "-c", "read -P 0x5a 5M 1M",
               "-c", "read -P 0 6M 64k"], timeout=30).stdout.decode()
    assert "verification failed" not in out and "error" not in out.lower(), out
    assert out.count("read 1048576/1048576 bytes") == 1, out


def test_plain_client_is_refused_and_others_go_on(server: TlsServer,
                                                  certs: Certificates) -> None:
    with pytest.raises(nbd.Error):
        libnbd_handle(server, None, tls=nbd.TLS_DISABLE)
    need("nbdinfo")
    refused = run(["nbdinfo", "--size", server.uri(scheme="nbd")], timeout=30, check=False)
    assert refused.returncode != 0
    assert b"TLS" in refused.stderr or b"tls" in refused.stderr, refused.stderr
    h = libnbd_handle(server, certs.good)  # the server still serves TLS clients
    try:
        round_trip(h, 7 * MiB, seed=2)
    finally:
        h.shutdown()


def test_raw_options_before_and_after_starttls(server: TlsServer, certs: Certificates) -> None:
    """What the spec asks of a FORCEDTLS server, byte by byte."""
    with RawNbd(server.port) as raw:
        raw.start()
        assert [r.type for r in raw.option(OPT_LIST)] == [REP_ERR_TLS_REQD]
        assert raw.go(EXPORT)[-1].type == REP_ERR_TLS_REQD
        assert [r.type for r in raw.option(OPT_STARTTLS, b"x")] == [REP_ERR_INVALID]
        assert [r.type for r in raw.option(OPT_STARTTLS)] == [REP_ACK]
        ctx = client_tls_context(certs.file("ca-cert.pem"))
        tls = ctx.wrap_socket(raw.sock, server_hostname="127.0.0.1")
        try:
            # a second STARTTLS inside TLS is invalid, and negotiation goes on
            tls.sendall(struct.pack(">QII", 0x49484156454F5054, OPT_STARTTLS, 0))
            _magic, option, reply, length = struct.unpack(">QIII", _recv(tls, 20))
            assert (option, reply) == (OPT_STARTTLS, REP_ERR_INVALID)
            _recv(tls, length)
            data = go_data(EXPORT)
            tls.sendall(struct.pack(">QII", 0x49484156454F5054, OPT_GO, len(data)) + data)
            while True:
                _magic, option, reply, length = struct.unpack(">QIII", _recv(tls, 20))
                _recv(tls, length)
                if reply == REP_ACK:
                    break
                assert not reply & 0x8000_0000, hex(reply)
        finally:
            tls.close()


def _recv(sock: object, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))  # type: ignore[attr-defined]
        assert chunk, "server closed"
        buf += chunk
    return buf


def test_export_name_before_tls_closes(server: TlsServer) -> None:
    with RawNbd(server.port) as raw:
        raw.start()
        raw.send_option(OPT_EXPORT_NAME, EXPORT.encode())
        assert raw.read_until_closed() == b""


def test_own_client_over_nbds(server: TlsServer, certs: Certificates) -> None:
    ctx = client_tls_context(certs.file("ca-cert.pem"))
    with NbdClient(server.uri(), tls=ctx) as client:
        assert client.tls_active and client.size == SIZE
        data = random_bytes(MiB, 3)
        client.pwrite(data, 9 * MiB)
        client.flush()
        assert client.pread(MiB, 9 * MiB) == data
        # many requests in one send: the pipelined path over TLS
        cookies = []
        buffers: list[bytes | memoryview] = []
        for i in range(8):
            cookie, parts = client.encode_request(1, 10 * MiB + i * 4096, 4096,
                                                  payload=bytes([i]) * 4096)
            cookies.append(cookie)
            buffers += parts
        client.send_buffers(buffers)
        assert sorted(client.next_reply()[0] for _ in cookies) == cookies
    # the URI alone, as libnbd reads it, does as well
    with NbdClient(server.uri(certs.good)) as client:
        assert client.pread(4096, 10 * MiB + 4096) == b"\x01" * 4096


def test_own_client_refuses_an_untrusted_server(server: TlsServer,
                                                certs: Certificates) -> None:
    with pytest.raises(NbdError, match="TLS handshake .* failed"):
        NbdClient(server.uri(certs.other_ca))
    # a plain client is told to use TLS
    with pytest.raises(NbdError):
        NbdClient(server.uri(scheme="nbd"))


# ---------------------------------------------------------------- under load

LOAD_BASE = 32 * MiB  # clear of what the tests above write
LOAD_REGION = 8 * MiB  # per connection
LOAD_CONNECTIONS = 4
DEPTH = 48


def _keep_in_flight(h: nbd.NBD, requests: Iterator[tuple[int, Callable[[], None]]]) -> int:
    """Submit requests (cookie, check once answered) with up to DEPTH issued and not
    yet answered until all are answered; returns the most there were at once."""
    in_flight: dict[int, Callable[[], None]] = {}
    peak = 0

    def settle(below: int) -> None:
        while len(in_flight) > below:
            cookie = h.aio_peek_command_completed()
            if cookie:
                h.aio_command_completed(cookie)  # raises if the server failed it
                in_flight.pop(cookie)()
            else:
                h.poll(-1)

    for cookie, check in requests:
        in_flight[cookie] = check
        peak = max(peak, len(in_flight))
        settle(DEPTH - 1)
    settle(0)
    return peak


def _load(h: nbd.NBD, base: int, seed: int) -> int:
    """Writes of mixed sizes in random order, reads of what they already wrote and
    flushes among them, then every byte read back; all pipelined."""
    rng = random.Random(seed)
    expected = random_bytes(LOAD_REGION, seed)
    chunks: list[tuple[int, int]] = []
    off = 0
    while off < LOAD_REGION:
        # inline on the server's reading thread; the flushes go to its helper threads
        n = min(LOAD_REGION - off, rng.choice((4096, 4096, 16384, 65536, 262144)))
        chunks.append((off, n))
        off += n
    rng.shuffle(chunks)
    written: list[tuple[int, int]] = []

    def read(off: int, n: int) -> tuple[int, Callable[[], None]]:
        buf = nbd.Buffer(n)

        def check() -> None:
            assert buf.to_bytearray() == expected[off : off + n], f"bad data at {base + off}"
        return h.aio_pread(buf, base + off), check

    def mixed() -> Iterator[tuple[int, Callable[[], None]]]:
        for i, (off, n) in enumerate(chunks):
            buf = nbd.Buffer.from_bytearray(bytearray(expected[off : off + n]))
            yield h.aio_pwrite(buf, base + off), lambda c=(off, n): written.append(c)
            if written and rng.random() < 0.5:
                yield read(*rng.choice(written))
            if i % 64 == 63:
                yield h.aio_flush(), lambda: None

    peak = _keep_in_flight(h, mixed())
    return max(peak, _keep_in_flight(h, (read(off, n) for off, n in chunks)))


def test_pipelined_load_on_several_connections(server: TlsServer, certs: Certificates) -> None:
    """Many requests in flight on each connection: the server reads requests while its
    helpers send replies on the same TLS connection."""
    log_before = server.device.log_text() if server.device is not None else ""
    handles = [libnbd_handle(server, certs.good) for _ in range(LOAD_CONNECTIONS)]
    try:
        with ThreadPoolExecutor(LOAD_CONNECTIONS) as pool:
            peaks = list(pool.map(lambda i: _load(handles[i], LOAD_BASE + i * LOAD_REGION,
                                                  seed=100 + i), range(LOAD_CONNECTIONS)))
        assert min(peaks) >= 32, peaks
    finally:
        for h in handles:
            h.shutdown()
    if server.device is not None:
        # no connection of this test ended on an error (earlier tests' may have)
        log = server.device.log_text()[len(log_before):]
        assert "Traceback" not in log and "closing connection" not in log, log


def test_fio_over_tls(server: TlsServer, certs: Certificates) -> None:
    """fio's nbd engine, two connections at queue depth 32, verified."""
    need("fio")
    if b"uri" not in run(["fio", "--enghelp=nbd"], timeout=30, check=False).stdout:
        pytest.skip("this fio has no nbd engine")
    # fio's engine refuses ?tls-certificates= (libnbd lets only programs that opt in
    # read local files named in a URI), so libnbd must find the CA in its default
    # directory: $HOME/.pki/libnbd for users other than root.  Root's is
    # /etc/pki/libnbd, not a test's to write: as root, fio runs as nobody.
    prefix: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("fio over TLS needs a user other than root, and runuser")
        prefix = ["runuser", "-u", "nobody", "--"]
    home = Path(tempfile.mkdtemp(prefix="fio-tls-"))  # pytest's tmp_path is root's alone
    try:
        (home / ".pki" / "libnbd").mkdir(parents=True)
        shutil.copy(certs.good / "ca-cert.pem", home / ".pki" / "libnbd" / "ca-cert.pem")
        for path in (home, home / ".pki", home / ".pki" / "libnbd"):
            path.chmod(0o777)  # fio leaves verify state files in its working directory
        (home / ".pki" / "libnbd" / "ca-cert.pem").chmod(0o644)
        result = run([*prefix, "env", f"HOME={home}", "fio", "--name=tls", "--ioengine=nbd",
                      f"--uri={server.uri()}", "--rw=randwrite", "--bsrange=4k-1m",
                      f"--offset={LOAD_BASE}", "--size=8M", "--numjobs=2",
                      "--offset_increment=8M", "--iodepth=32", "--verify=crc32c",
                      "--do_verify=1", "--verify_fatal=1", "--output-format=json"],
                     timeout=120, check=False, cwd=home)
    finally:
        shutil.rmtree(home)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    jobs = json.loads(out[out.index("{"):])["jobs"]
    assert len(jobs) == 2
    for job in jobs:
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] == job["read"]["io_bytes"] == 8 * MiB, job


# ---------------------------------------------------------------- client certificates


@pytest.mark.parametrize("who", ["no_client", "rogue_client"])
def test_client_without_a_good_certificate_is_refused(
    mtls_server: TlsServer, certs: Certificates, who: str
) -> None:
    directory = getattr(certs, who)
    failures = mtls_server.handshake_failures()
    with pytest.raises(nbd.Error):
        libnbd_handle(mtls_server, directory)
    # the same with our own client, by URI
    with pytest.raises(NbdError), NbdClient(mtls_server.uri(directory)) as client:
        client.pread(512, 0)  # TLS 1.3 may report the refusal only on first use
    if mtls_server.device is not None:
        # logged once per refused connection, and only that connection ends
        wait_until(lambda: mtls_server.handshake_failures() >= failures + 2, 10,
                   "the refusals to be logged")
        assert mtls_server.handshake_failures() == failures + 2
        assert "Traceback" not in mtls_server.device.log_text()
    h = libnbd_handle(mtls_server, certs.good)
    try:
        round_trip(h, 11 * MiB, seed=4)
    finally:
        h.shutdown()


def test_good_client_certificate_works(mtls_server: TlsServer, certs: Certificates) -> None:
    need("nbdinfo", "qemu-io")
    out = json.loads(run(["nbdinfo", "--json", mtls_server.uri(certs.good)], timeout=30).stdout)
    assert out["exports"][0]["export-size"] == SIZE
    creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={certs.good}"
    image = f"driver=nbd,host=127.0.0.1,port={mtls_server.port},export={EXPORT},tls-creds=tls0"
    out = run(["qemu-io", "--object", creds, "--image-opts", image,
               "-c", "write -P 0x33 12M 64k", "-c", "read -P 0x33 12M 64k"],
              timeout=30).stdout.decode()
    assert "verification failed" not in out, out
    ctx = client_tls_context(certs.file("ca-cert.pem"), certs.file("client-cert.pem"),
                             certs.file("client-key.pem"))
    with NbdClient(mtls_server.uri(), tls=ctx) as client:
        assert client.pread(65536, 12 * MiB) == b"\x33" * 65536


# ---------------------------------------------------------------- TLS offered


def test_tls_on_serves_plain_and_tls_clients(certs: Certificates, tmp_path: Path) -> None:
    need("nbdinfo")
    for srv in _start("mirrorpool", certs, tmp_path, verify_clients=False, mode="on"):
        assert srv.device is not None
        assert f"serving NBD address=nbd://127.0.0.1:{srv.port}" in srv.device.log_text()
        plain = json.loads(run(["nbdinfo", "--json", srv.uri(scheme="nbd")]).stdout)
        assert plain["TLS"] is False
        secure = json.loads(run(["nbdinfo", "--json", srv.uri(certs.good)]).stdout)
        assert secure["TLS"] is True
        assert secure["exports"][0]["export-size"] == SIZE
        with NbdClient(srv.uri(certs.no_client)) as client:
            assert client.tls_active
        with NbdClient(srv.uri(scheme="nbd")) as client:
            assert not client.tls_active
