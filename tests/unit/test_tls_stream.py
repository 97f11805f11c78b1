"""TlsStream against a real TLS client (ssl.SSLSocket) over a socket pair: one reading
thread and several writers at once, as the NBD server uses it."""

from __future__ import annotations

import contextlib
import random
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from mirrorpool.nbd.tls import TlsStream, client_tls_context, server_tls_context
from tests.conftest import need
from tests.helpers.tls import Certificates, make_certificates

FRAME = struct.Struct(">II")  # sequence number, payload length


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    need("openssl")
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def pair(certs: Certificates) -> Iterator[tuple[TlsStream, ssl.SSLSocket]]:
    """A server-side TlsStream and a client SSLSocket, handshake done."""
    ours, theirs = socket.socketpair()
    ours.settimeout(30)
    theirs.settimeout(30)
    stream = TlsStream(ours, server_tls_context(certs.file("server-cert.pem"),
                                               certs.file("server-key.pem")), server_side=True)
    handshake = threading.Thread(target=stream.do_handshake)
    handshake.start()
    client = client_tls_context(certs.file("ca-cert.pem")).wrap_socket(
        theirs, server_hostname="localhost")
    handshake.join(30)
    assert not handshake.is_alive()
    yield stream, client
    client.close()
    stream.close()


def _recv_exact(stream: TlsStream, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        got = stream.recv_into(view)
        if not got:
            return None
        view = view[got:]
    return bytes(buf)


def _payload(seq: int, size: int) -> bytes:
    return random.Random(seq).randbytes(size)


def _converse(client: ssl.SSLSocket, requests: bytes, want: int) -> bytes:
    """Send every request while taking replies, on one thread (SSLSocket is no safer
    than the server's old path), until ``want`` reply bytes arrived."""
    client.setblocking(False)
    out = memoryview(requests)
    replies = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(client, selectors.EVENT_READ | selectors.EVENT_WRITE)
        deadline = time.monotonic() + 60
        while len(replies) < want:
            assert time.monotonic() < deadline, f"{len(replies)} of {want} reply bytes"
            if not out:
                sel.modify(client, selectors.EVENT_READ)
            sel.select(1)
            if out:
                with contextlib.suppress(ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    out = out[client.send(out[:65536]):]
            with contextlib.suppress(ssl.SSLWantReadError):
                while data := client.recv(1 << 20):
                    replies += data
    client.setblocking(True)
    return bytes(replies)


def test_one_reader_and_several_writers_at_once(pair: tuple[TlsStream, ssl.SSLSocket]) -> None:
    """Requests are read while helper threads send replies of every size (under a
    record, over a write chunk), as the server's helpers do; every reply arrives whole."""
    stream, client = pair
    sizes = [1, 16, 4096, 16383, 16384, 70000, 131072, 300000]
    count = 600
    rng = random.Random(7)
    plan = [(seq, rng.choice(sizes)) for seq in range(count)]
    requests = b"".join(FRAME.pack(seq, size) + _payload(seq, size) for seq, size in plan)
    want = sum(FRAME.size + size for _seq, size in plan)

    def answer(seq: int, data: bytes) -> None:
        time.sleep(random.random() / 1000)  # let the replies overtake one another
        if seq % 3:
            stream.sendmsg([FRAME.pack(seq, len(data)), memoryview(data)])
        else:
            stream.sendall(FRAME.pack(seq, len(data)) + data)

    def serve() -> None:
        with ThreadPoolExecutor(4) as writers:
            answers = []
            for _ in range(count):
                header = _recv_exact(stream, FRAME.size)
                assert header is not None
                seq, size = FRAME.unpack(header)
                data = _recv_exact(stream, size)
                assert data is not None
                answers.append(writers.submit(answer, seq, data))
        for done in answers:
            done.result()
        assert stream.recv_into(bytearray(16)) == 0  # the client's close_notify

    with ThreadPoolExecutor(1) as server:
        served = server.submit(serve)
        replies = memoryview(_converse(client, requests, want))
        client.setblocking(False)
        with contextlib.suppress(ssl.SSLWantReadError):  # ours sent, theirs not awaited
            client.unwrap()  # close_notify: the server's read ends with 0
        served.result(30)
    seen = set()
    while replies:
        seq, size = FRAME.unpack(replies[: FRAME.size])
        assert bytes(replies[FRAME.size : FRAME.size + size]) == _payload(seq, size), seq
        seen.add(seq)
        replies = replies[FRAME.size + size :]
    assert seen == set(range(count))


def test_shutdown_interrupts_a_blocked_reader(pair: tuple[TlsStream, ssl.SSLSocket]) -> None:
    stream, _client = pair
    with ThreadPoolExecutor(1) as reader:
        read = reader.submit(stream.recv_into, bytearray(64))
        time.sleep(0.2)
        assert not read.done()
        stream.shutdown(socket.SHUT_RDWR)
        assert read.result(5) == 0


def test_close_sends_close_notify(pair: tuple[TlsStream, ssl.SSLSocket]) -> None:
    stream, client = pair
    stream.sendall(b"last words")
    stream.close()
    assert client.recv(64) == b"last words"
    assert client.recv(64) == b""  # close_notify, not a ragged end


def test_handshake_with_a_client_that_does_not_trust_the_server(
    certs: Certificates,
) -> None:
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    stream = TlsStream(ours, server_tls_context(certs.file("server-cert.pem"),
                                               certs.file("server-key.pem")), server_side=True)
    with ThreadPoolExecutor(1) as server:
        handshake = server.submit(stream.do_handshake)
        with pytest.raises(ssl.SSLCertVerificationError):
            client_tls_context(str(certs.other_ca / "ca-cert.pem")).wrap_socket(
                theirs, server_hostname="localhost")
        theirs.close()
        with pytest.raises(OSError):  # an ssl.SSLError: the client's alert
            handshake.result(10)
    stream.close()
