"""The client's pipelined reply reading: many replies per wake-up, none lost or invented."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrorpool.nbd.client import NbdClient
from mirrorpool.nbd.codec import encode_chunk_header, encode_simple_reply
from tests.helpers.tls import make_certificates

MAGIC_PAYLOAD = b'{"generations": []}'


@pytest.fixture
def pair() -> Iterator[tuple[NbdClient, socket.socket]]:
    """A client past its handshake, on TCP loopback, and the server's end of it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    client = NbdClient.__new__(NbdClient)  # no handshake: the replies are what is tested
    client.sock = sock
    client._reader = sock.makefile("rb", buffering=1 << 16)
    client._tcp = True
    client.tls_active = False
    yield client, server
    client._reader.close()
    sock.close()
    server.close()


def test_replies_already_in_come_in_one_call(pair: tuple[NbdClient, socket.socket]) -> None:
    client, server = pair
    server.sendall(b"".join(encode_simple_reply(c, 5 if c == 3 else 0) for c in range(1, 6)))
    time.sleep(0.05)
    got = client.next_replies(5)
    assert [(c, e) for c, e, _, _ in got] == [(1, 0), (2, 0), (3, 5), (4, 0), (5, 0)]


def test_a_structured_reply_after_simple_ones(pair: tuple[NbdClient, socket.socket]) -> None:
    client, server = pair
    server.sendall(encode_simple_reply(7) + encode_chunk_header(8, 0x4D50, len(MAGIC_PAYLOAD))
                   + MAGIC_PAYLOAD + encode_simple_reply(9))
    time.sleep(0.05)
    assert [c for c, _, _, _ in client.next_replies(3)] == [7]
    cookie, error, _, chunks = client.next_replies(2)[0]
    assert (cookie, error, chunks) == (8, 0, [(0x4D50, MAGIC_PAYLOAD)])
    assert [c for c, _, _, _ in client.next_replies(1)] == [9]


def test_the_wait_for_a_window_ends_when_its_replies_are_in(
    pair: tuple[NbdClient, socket.socket],
) -> None:
    """Replies trickling in, and one cut in two: the call never waits past the last one."""
    client, server = pair
    replies = b"".join(encode_simple_reply(c) for c in range(1, 9))

    def trickle() -> None:
        for piece in (replies[:20], replies[20:70], replies[70:]):
            time.sleep(0.05)
            server.sendall(piece)

    thread = threading.Thread(target=trickle)
    thread.start()
    started = time.monotonic()
    first = client.next_replies(8)
    thread.join()
    # one wake-up for the window: the kernel gathered the pieces before answering
    assert [c for c, _, _, _ in first] == list(range(1, 9))
    assert time.monotonic() - started < 5
    # the low-water mark is back to one byte for every other read
    assert client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1


def test_a_tls_record_cut_in_two_does_not_stall_the_wait(tmp_path: Path) -> None:
    """Part of a record already inside the TLS library is not in the kernel's count."""
    certs = make_certificates(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.file("server-cert.pem"), certs.file("server-key.pem"))
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(certs.file("ca-cert.pem"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = server_ctx.wrap_bio(incoming, outgoing, server_side=True)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        raw = socket.create_connection(listener.getsockname(), timeout=3)
        server, _ = listener.accept()

    def handshake() -> None:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                server.sendall(outgoing.read())
                incoming.write(server.recv(65536))
        server.sendall(outgoing.read())

    thread = threading.Thread(target=handshake)
    thread.start()
    sock = client_ctx.wrap_socket(raw, server_hostname="localhost")
    thread.join()
    client = NbdClient.__new__(NbdClient)
    client.sock = sock
    client._reader = sock.makefile("rb", buffering=1 << 16)
    client._tcp = True
    client.tls_active = True
    try:
        outgoing.read()  # session tickets
        tls.write(b"".join(encode_simple_reply(c) for c in range(1, 65)))  # one record
        record = outgoing.read()
        server.sendall(record[:800])
        time.sleep(0.1)
        threading.Timer(0.2, lambda: server.sendall(record[800:])).start()
        cookies: list[int] = []
        while len(cookies) < 64:  # a 3 s socket timeout would end a stalled wait
            cookies += [c for c, _, _, _ in client.next_replies(64 - len(cookies))]
        assert cookies == list(range(1, 65))
    finally:
        client._reader.close()
        sock.close()
        server.close()
