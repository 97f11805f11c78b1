"""Bounded polling of a connection's socket before its thread sleeps."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from mirrorpool.nbd import polling
from mirrorpool.nbd.polling import MAX_MISSES, PollBudget, PolledReceiver


class RecordingSocket:
    """A real socket whose receives are counted: polled (MSG_DONTWAIT) or sleeping."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.polls = 0
        self.sleeps = 0

    def recv_into(self, view: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        if flags & socket.MSG_DONTWAIT:
            self.polls += 1
        else:
            self.sleeps += 1
        return self.sock.recv_into(view, nbytes, flags)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def send_later(sock: socket.socket, data: bytes, delay: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), sock.sendall(data)))
    t.start()
    return t


def test_a_request_within_the_window_is_taken_by_polling(pair) -> None:
    server, client = pair
    spy = RecordingSocket(server)
    receiver = PolledReceiver(PollBudget(window_us=2_000_000), spy)  # type: ignore[arg-type]
    buf = bytearray(16)
    t = send_later(client, b"request", 0.01)
    n = receiver.recv_into(memoryview(buf))
    t.join()
    assert bytes(buf[:n]) == b"request"
    assert spy.polls >= 2  # it found nothing at first and kept polling
    assert spy.sleeps == 0


def test_slow_requests_stop_the_polling_and_quick_ones_start_it_again(pair) -> None:
    server, client = pair
    spy = RecordingSocket(server)
    budget = PollBudget(window_us=2_000)
    receiver = PolledReceiver(budget, spy)  # type: ignore[arg-type]
    buf = memoryview(bytearray(16))
    for _ in range(MAX_MISSES):  # each comes after the window: a miss, then a sleep
        t = send_later(client, b"x", 0.05)
        assert receiver.recv_into(buf) == 1
        t.join()
    assert spy.sleeps == MAX_MISSES
    polls = spy.polls
    t = send_later(client, b"y", 0.05)
    assert receiver.recv_into(buf) == 1
    t.join()
    assert spy.polls == polls, "a connection with slow requests went on polling"
    # a request that was already there when the thread went to sleep re-arms polling
    client.sendall(b"z")
    assert receiver.recv_into(buf) == 1
    client.sendall(b"w")
    polls = spy.polls
    assert receiver.recv_into(buf) == 1
    assert spy.polls == polls + 1


def test_pollers_are_bounded_by_the_budget(pair) -> None:
    server, client = pair
    spy = RecordingSocket(server)
    budget = PollBudget(window_us=2_000_000, max_pollers=1)
    held = budget.take_slot()
    assert held is not None and budget.take_slot() is None
    receiver = PolledReceiver(budget, spy)  # type: ignore[arg-type]
    t = send_later(client, b"x", 0.01)
    assert receiver.recv_into(memoryview(bytearray(4))) == 1
    t.join()
    assert spy.polls == 0 and spy.sleeps == 1  # every slot taken: it slept at once
    held.release()
    slot = budget.take_slot()
    assert slot is not None, "a poller's slot was not given back"
    slot.release()


def test_a_peer_that_closes_while_polled_reads_as_end_of_stream(pair) -> None:
    server, client = pair
    receiver = PolledReceiver(PollBudget(window_us=2_000_000), server)
    t = threading.Thread(target=lambda: (time.sleep(0.01), client.shutdown(socket.SHUT_WR)))
    t.start()
    assert receiver.recv_into(memoryview(bytearray(4))) == 0
    t.join()


def test_no_window_means_no_polling() -> None:
    assert not PollBudget(window_us=0).enabled
    with pytest.raises(ValueError):
        PollBudget(window_us=-1)


@pytest.mark.parametrize(("cpus", "pollers"), [(1, 0), (2, 1), (3, 1), (8, 4)])
def test_pollers_are_half_the_cpus_the_process_may_use(monkeypatch, cpus, pollers) -> None:
    monkeypatch.setattr(polling.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert polling.default_pollers() == pollers
    assert PollBudget(window_us=100).enabled is (pollers > 0)
