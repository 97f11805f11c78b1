"""The link's flusher: what it may mark as on the remote device's stable storage."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mirrorpool.replication import link
from mirrorpool.replication.journal import ReplicationJournal
from mirrorpool.replication.link import CONSISTENT, RemoteConfig, Replicator


class FlushingClient:
    def __init__(self, during_flush: object = None) -> None:
        self.during_flush = during_flush
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        if callable(self.during_flush):
            self.during_flush()

    def abort(self) -> None:
        pass


def _acked_after_flushes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         reconnect: bool, sender_follows: bool = True) -> int:
    """acked_seq after the flusher ran a few turns, with 10 records answered.

    ``sender_follows``: the sender reconnects when the flusher connects (as its kick
    makes it do); ``reconnect``: the sender reconnects again during a flush.
    """
    monkeypatch.setattr(link, "FLUSH_EVERY", 0.01)
    volume = SimpleNamespace(seq=SimpleNamespace(lock=threading.Lock(), last_seq=10),
                             size=1 << 20)
    config = RemoteConfig(lu="x", device="", nbd="nbd://127.0.0.1:9/x", remote="x",
                          state=CONSISTENT)
    journal = ReplicationJournal(str(tmp_path), 1 << 20)
    replicator = Replicator(config, volume, journal, save=lambda _r: None)  # type: ignore[arg-type]
    replicator.replied_seq = 10  # answered on the sender's connection
    replicator.connected = True

    def sender_reconnects() -> None:
        # the remote device went away and came back without what it had not flushed
        replicator.replied_seq = replicator.acked_seq
        replicator._connections = getattr(replicator, "_connections", 0) + 1

    client = FlushingClient(sender_reconnects if reconnect else None)

    def connect(**_kw: object) -> FlushingClient:
        if sender_follows:
            replicator._connections = getattr(replicator, "_connections", 0) + 1
        return client

    monkeypatch.setattr(replicator, "_connect", connect)
    flusher = threading.Thread(target=replicator._flush_loop, daemon=True)
    flusher.start()
    deadline = time.monotonic() + 5
    while not client.flushes and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # several more turns of the loop
    replicator._stopping = True
    replicator._stop_event.set()
    flusher.join(5)
    journal.close()
    return replicator.acked_seq


def test_a_flush_acknowledges_what_the_sender_saw_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _acked_after_flushes(tmp_path, monkeypatch, reconnect=False) == 10


def test_a_flush_across_a_reconnection_acknowledges_nothing_of_the_old_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Records answered before the remote device lost power are not on its disk: marked
    acknowledged, they would be trimmed from the journal and never sent again."""
    assert _acked_after_flushes(tmp_path, monkeypatch, reconnect=True) == 0


def test_a_new_flusher_connection_vouches_only_for_a_newer_sender_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An idle sender would not notice that the remote device restarted; the flusher,
    reconnecting, cannot tell either: it acknowledges nothing the sender's older
    connection had answered."""
    assert _acked_after_flushes(tmp_path, monkeypatch, reconnect=False,
                                sender_follows=False) == 0


def test_the_flusher_connecting_ends_the_senders_connection(tmp_path: Path) -> None:
    journal = ReplicationJournal(str(tmp_path), 1 << 20)
    volume = SimpleNamespace(seq=SimpleNamespace(lock=threading.Lock(), last_seq=0),
                             size=1 << 20)
    config = RemoteConfig(lu="x", device="", nbd="", remote="x", state=CONSISTENT)
    replicator = Replicator(config, volume, journal, save=lambda _r: None)  # type: ignore[arg-type]
    ours, theirs = socket.socketpair()
    try:
        replicator._client = SimpleNamespace(sock=ours)  # type: ignore[assignment]
        replicator._kick_sender()
        assert theirs.recv(1) == b""  # the connection was shut down
        assert replicator._kicked
    finally:
        ours.close()
        theirs.close()
        journal.close()
