"""How the replication sender cuts the journal into windows (no remote device needed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from mirrorpool.nbd.codec import REQUEST_HEADER
from mirrorpool.replication import link
from mirrorpool.replication.journal import Kind, Record, ReplicationJournal
from mirrorpool.replication.link import (
    CONSISTENT,
    RemoteConfig,
    Replicator,
    forwarded_payload,
)


class AnsweringClient:
    """Takes windows of requests and answers each without error."""

    def __init__(self) -> None:
        self.windows: list[list[int]] = []
        self.sent_at: list[float] = []
        self._due: list[int] = []

    def send_buffers(self, buffers: list) -> None:
        cookies = [REQUEST_HEADER.unpack_from(bytes(b[: REQUEST_HEADER.size]))[3]
                   for b in buffers]
        self.windows.append(cookies)
        self.sent_at.append(time.monotonic())
        self._due += cookies

    def next_replies(self, outstanding: int = 1) -> list[tuple[int, int, str, list]]:
        due, self._due = self._due, []
        return [(cookie, 0, "", []) for cookie in due]


def make_replicator(journal: ReplicationJournal,
                    committed: Callable[[str], bool] = lambda _id: True) -> Replicator:
    """A replicator of ``journal``; ``committed`` says whether a TRIGGER journalled before
    it was made was answered here (by default: all were)."""
    volume = SimpleNamespace(seq=SimpleNamespace(lock=threading.Lock(), last_seq=0),
                             size=1 << 30)
    config = RemoteConfig(lu="lu", device="", nbd="", remote="lu", state=CONSISTENT)
    return Replicator(config, volume, journal, save=lambda _r: None,  # type: ignore[arg-type]
                      trigger_committed=committed)


def serve_until(journal: ReplicationJournal, last_seq: int,
                replicator: Replicator | None = None) -> AnsweringClient:
    """Run the sender on ``journal`` until the record ``last_seq`` is answered."""
    replicator = replicator or make_replicator(journal)
    client = AnsweringClient()
    thread = threading.Thread(target=replicator._serve, args=(client,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while replicator.replied_seq < last_seq:
        assert time.monotonic() < deadline, client.windows
        time.sleep(0.005)
    replicator._stopping = True
    replicator._wake.set()
    replicator._stop_event.set()
    thread.join(5)
    return client


def test_a_trigger_leads_a_window_of_its_own(tmp_path: Path) -> None:
    """Writes before a TRIGGER are all answered before it is sent: a write the remote
    device failed is sent again before the remote split, never after it."""
    journal = ReplicationJournal(str(tmp_path), 1 << 20)
    for seq in (1, 2):
        journal.append(Record(Kind.WRITE, seq, seq * 4096, 4096, b"\x01" * 4096))
    journal.append(Record(Kind.TRIGGER, 3, 0, 0, forwarded_payload("t", "x", 3, 1)))
    journal.append(Record(Kind.WRITE, 4, 0, 4096, b"\x02" * 4096))
    client = serve_until(journal, 4)
    assert client.windows == [[1, 2], [3, 4]]


def test_full_windows_are_sent_without_waiting_for_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wait that lets a trickle of records gather is for a link that ran dry."""
    monkeypatch.setattr(link, "GATHER_FOR", 2.0)
    journal = ReplicationJournal(str(tmp_path), 64 << 20)
    for seq in range(1, 21):  # 20 MiB: windows of 8 MiB, so of 8 records or fewer
        journal.append(Record(Kind.WRITE, seq, seq << 20, 1 << 20, bytes([seq]) * (1 << 20)))
    started = time.monotonic()
    client = serve_until(journal, 20)
    assert len(client.windows) >= 3
    assert client.sent_at[-1] - started < 2.0, client.windows


def _writes_around_a_trigger(journal: ReplicationJournal) -> None:
    for seq in (1, 2):
        journal.append(Record(Kind.WRITE, seq, seq * 4096, 4096, b"\x01" * 4096))
    journal.append(Record(Kind.TRIGGER, 3, 0, 0, forwarded_payload("t", "x", 3, 1)))
    journal.append(Record(Kind.WRITE, 4, 0, 4096, b"\x02" * 4096))


def test_a_trigger_waits_for_its_split_here_to_complete(tmp_path: Path) -> None:
    """Sent before the writes ahead of it were applied here, a crash could leave the
    remote generation holding a write this device's generation lacks."""
    journal = ReplicationJournal(str(tmp_path), 1 << 20)
    replicator = make_replicator(journal)
    _writes_around_a_trigger(journal)  # journalled after the start: held until told
    done = threading.Timer(0.3, replicator.trigger_done, args=(3, True))
    done.start()
    started = time.monotonic()
    client = serve_until(journal, 4, replicator)
    assert client.windows == [[1, 2], [3, 4]]
    assert client.sent_at[1] - started >= 0.25  # not before the split completed
    done.join()


def test_a_trigger_whose_split_failed_here_is_never_sent(tmp_path: Path) -> None:
    journal = ReplicationJournal(str(tmp_path), 1 << 20)
    replicator = make_replicator(journal)
    _writes_around_a_trigger(journal)
    replicator.trigger_done(3, False)
    client = serve_until(journal, 4, replicator)
    assert client.windows == [[1, 2], [4]]
    assert replicator.not_replicated == 1


@pytest.mark.parametrize("answered", [True, False])
def test_a_trigger_journalled_before_a_restart_goes_if_it_was_answered(
    tmp_path: Path, answered: bool,
) -> None:
    """After a crash, a split completed at start-up was never answered: the writes
    before it may not all have been applied here, so the remote device makes none."""
    journal = ReplicationJournal(str(tmp_path), 1 << 20)
    _writes_around_a_trigger(journal)
    asked: list[str] = []
    replicator = make_replicator(journal, lambda tid: asked.append(tid) or answered)
    client = serve_until(journal, 4, replicator)
    assert asked == ["t"]
    assert client.windows == ([[1, 2], [3, 4]] if answered else [[1, 2], [4]])
