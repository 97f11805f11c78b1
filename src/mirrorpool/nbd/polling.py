"""Bounded busy-polling of a connection's socket before its thread sleeps.

A host at queue depth 1 sends its next request a few tens of microseconds
after it gets our reply.  If the serving thread sleeps in recv() for that gap,
its CPU goes idle, and waking an idle CPU (an interrupt; on a virtual machine,
an exit to the hypervisor as well) takes longer than the gap itself.  A thread
that first polls its socket for a short window keeps its CPU awake and takes
the request the moment it lands.

Polling is bounded three ways: by the window; by how many threads may poll at
once, so that polling never takes every CPU from the hosts and the background
work; and by each connection's recent gaps, so that a connection whose
requests come slower than the window stops polling until they speed up again.
"""

from __future__ import annotations

import os
import socket
import threading
import time

DEFAULT_POLL_US = 100
# Polls that found nothing, in a row, before a connection stops polling.
MAX_MISSES = 2
_DONTWAIT = socket.MSG_DONTWAIT


def default_pollers() -> int:
    """Threads that may poll at once: half the CPUs this process may run on.

    None on a single CPU: the request a poller waits for is sent by a host or
    made by a thread that needs that same CPU, so spinning only delays it.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus // 2


class PollBudget:
    """The device-wide polling settings and the slots that bound the pollers."""

    def __init__(self, window_us: int, max_pollers: int | None = None) -> None:
        if window_us < 0:
            raise ValueError("the polling window cannot be negative")
        self.window = window_us / 1e6
        self.max_pollers = max_pollers if max_pollers is not None else default_pollers()
        # One lock per slot: a non-blocking acquire of a C lock is the cheapest try.
        self._slots = [threading.Lock() for _ in range(self.max_pollers)]

    @property
    def enabled(self) -> bool:
        return self.window > 0 and self.max_pollers > 0

    def take_slot(self) -> threading.Lock | None:
        for slot in self._slots:
            if slot.acquire(False):
                return slot
        return None


class PolledReceiver:
    """``recv_into`` for one connection's socket, polling first while that pays off."""

    def __init__(self, budget: PollBudget, sock: socket.socket) -> None:
        self._budget = budget
        self._recv_into = sock.recv_into
        self._misses = 0

    def recv_into(self, view: memoryview) -> int:
        window = self._budget.window
        if self._misses < MAX_MISSES:
            slot = self._budget.take_slot()
            if slot is not None:
                try:
                    n = self._poll(view, window)
                finally:
                    slot.release()
                if n is not None:
                    self._misses = 0
                    return n
                self._misses += 1
        started = time.monotonic()
        n = self._recv_into(view)
        if time.monotonic() - started <= window:
            self._misses = 0  # requests come quickly again: poll for the next one
        return n

    def _poll(self, view: memoryview, window: float) -> int | None:
        recv_into = self._recv_into
        deadline = time.monotonic() + window
        while True:
            try:
                return recv_into(view, 0, _DONTWAIT)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return None
