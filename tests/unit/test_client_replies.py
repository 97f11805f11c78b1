"""The client's pipelined reply reading: many replies per wake-up, none lost or invented."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from mirrorpool.nbd.client import NbdClient
from mirrorpool.nbd.codec import encode_chunk_header, encode_simple_reply

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
    cookies: list[int] = []
    started = time.monotonic()
    while len(cookies) < 8:
        cookies += [c for c, _, _, _ in client.next_replies(8 - len(cookies))]
    thread.join()
    assert cookies == list(range(1, 9))
    assert time.monotonic() - started < 5
    # the low-water mark is back to one byte for every other read
    assert client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
