"""A link's replay of its journal after a crash, when it is stopped or crashes again."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from pyroaring import BitMap

from mirrorpool.mirror.changes import CHUNK
from mirrorpool.replication.journal import Kind, Record, ReplicationJournal
from mirrorpool.replication.link import (
    INCONSISTENT,
    REPLAYING,
    RemoteConfig,
    Replicator,
    forwarded_payload,
)

SIZE = 64 * CHUNK


def _replaying(tmp_path: Path) -> Replicator:
    """A link saved while it replayed: its journal still holds a write, an answered
    TRIGGER and another write the remote device has not had."""
    journal = ReplicationJournal(str(tmp_path), 1 << 20)
    journal.append(Record(Kind.WRITE, 1, 0, 4096, b"\x01" * 4096))
    journal.append(Record(Kind.TRIGGER, 2, 0, 0, forwarded_payload("t", "x", 2, 1)))
    journal.append(Record(Kind.WRITE, 3, 8192, 4096, b"\x03" * 4096))
    journal.persist()
    volume = SimpleNamespace(seq=SimpleNamespace(lock=threading.Lock(), last_seq=3),
                             size=SIZE)
    config = RemoteConfig(lu="x", device="", nbd="", remote="x", state=REPLAYING,
                          dirty=BitMap([9]))  # written after the first crash, then saved
    return Replicator(config, volume, journal, save=lambda _r: None,  # type: ignore[arg-type]
                      trigger_committed=lambda _id: True)


def test_a_replay_stopped_cleanly_goes_on_where_it_was(tmp_path: Path) -> None:
    """Its TRIGGER was answered as replicated: the replay still sends it."""
    replicator = _replaying(tmp_path)
    replicator.journal_unsent_on_start()
    assert replicator.state == REPLAYING
    assert replicator._replay_until == 3
    assert not replicator._overflow  # the journal is sent, not turned into chunks
    replicator.journal.close()


def test_a_crash_during_a_replay_replays_again_then_compares_every_chunk(
    tmp_path: Path,
) -> None:
    """What the first replay had not sent is sent; the chunks written since the first
    crash were marked in memory and not all saved, so every chunk is compared."""
    replicator = _replaying(tmp_path)
    replicator.after_crash(BitMap([5]))
    assert replicator.state == REPLAYING
    assert replicator._replay_until == 3
    replicator.replied_seq = 3  # the journal was sent
    replicator._end_replay()
    assert replicator.state == INCONSISTENT
    assert set(replicator.dirty) == {5, 9}
    assert replicator.compare == BitMap(range(SIZE // CHUNK)) - BitMap([5, 9])
    replicator.journal.close()
