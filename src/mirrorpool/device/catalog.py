"""Metadata in SQLite (WAL, synchronous=FULL): what LUs exist and how they are made."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SCHEMA_VERSION = 1
# the trigger log's detail for a split a crash cut short, completed by the next start:
# never answered
COMPLETED_AT_START_UP = "split completed at start-up after a crash"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS lu (
    name TEXT PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL CHECK (size > 0),
    pool INTEGER NOT NULL CHECK (pool >= 0),
    backing TEXT,
    created REAL NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    open_changes BLOB
);
CREATE TABLE IF NOT EXISTS member (
    lu TEXT NOT NULL REFERENCES lu(name) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    state TEXT NOT NULL,            -- spare | active | generation | failed
    gen INTEGER,                    -- generation it holds (state generation)
    last_used INTEGER NOT NULL DEFAULT 0,
    pending BLOB,                   -- chunks still to copy from the primary
    PRIMARY KEY (lu, idx)
);
CREATE TABLE IF NOT EXISTS generation (
    lu TEXT NOT NULL REFERENCES lu(name) ON DELETE CASCADE,
    gen INTEGER NOT NULL,
    member INTEGER NOT NULL,
    trigger_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL,
    created REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'ready',   -- ready | recycled
    changes BLOB,                   -- chunks written since the previous generation
    PRIMARY KEY (lu, gen)
);
-- Pruning change sets visits only rows that still hold one: recycled rows stay as
-- history, and a device that splits every 100 ms makes 864,000 of them a day.
CREATE INDEX IF NOT EXISTS generation_with_changes ON generation (lu, gen)
    WHERE changes IS NOT NULL;
CREATE TABLE IF NOT EXISTS replica (   -- this LU is replicated to a remote device
    lu TEXT PRIMARY KEY REFERENCES lu(name) ON DELETE CASCADE,
    device TEXT NOT NULL,           -- the remote device's control API
    nbd TEXT NOT NULL,              -- the remote LU over NBD
    remote TEXT NOT NULL,           -- the remote LU's name
    mode TEXT NOT NULL,             -- async | sync
    journal_limit INTEGER NOT NULL,
    acked_seq INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,            -- syncing | consistent | inconsistent
    dirty BLOB,
    options TEXT NOT NULL DEFAULT '{}'  -- JSON: link timeouts, TLS files, NBD address
);
CREATE TABLE IF NOT EXISTS replica_of (   -- this LU is the remote copy of another device's LU
    lu TEXT PRIMARY KEY REFERENCES lu(name) ON DELETE CASCADE,
    source_device TEXT NOT NULL,    -- the source device's id
    source_lu TEXT NOT NULL,
    source_uuid TEXT NOT NULL,      -- the source LU's uuid: the link's export name holds it
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS remote_origin (   -- generations made by a forwarded TRIGGER
    lu TEXT NOT NULL REFERENCES lu(name) ON DELETE CASCADE,
    gen INTEGER NOT NULL,
    origin_seq INTEGER NOT NULL,
    origin_gen INTEGER,
    PRIMARY KEY (lu, gen)
);
CREATE TABLE IF NOT EXISTS trigger_log (
    id TEXT PRIMARY KEY,
    lus TEXT NOT NULL,
    seqs TEXT NOT NULL,
    source TEXT NOT NULL,
    label TEXT NOT NULL,
    received REAL NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True)
class LuRecord:
    name: str
    uuid: str
    size: int
    pool: int
    backing: str | None  # an external file or block device; None: inside the data dir
    created: float


@dataclass(frozen=True)
class MemberRecord:
    idx: int
    state: str
    gen: int | None
    last_used: int
    pending: bytes | None


@dataclass(frozen=True)
class GenerationRecord:
    gen: int
    member: int
    trigger_id: str
    seq: int
    label: str
    source: str
    created: float
    pinned: bool
    state: str
    changes: bytes | None


class Catalog:
    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._depth = 0
        # replica_of answers: LU -> row (None: not a remote copy)
        self._replica_of: dict[str, tuple[str, str, str, float] | None] = {}
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(replica)")}
        if "options" not in columns:  # catalogs made before link options existed
            self._db.execute("ALTER TABLE replica ADD COLUMN options TEXT NOT NULL DEFAULT '{}'")
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise RuntimeError(
                    f"metadata schema {row[0]} is newer than this mirrorpool ({SCHEMA_VERSION})"
                )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable step; nested uses join the outer one (one commit, one sync)."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._db
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                self._depth = 0
                self._replica_of.clear()

    def lus(self) -> list[LuRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, uuid, size, pool, backing, created FROM lu ORDER BY name"
            ).fetchall()
        return [LuRecord(*row) for row in rows]

    def add_lu(self, name: str, uuid: str, size: int, pool: int, backing: str | None) -> LuRecord:
        record = LuRecord(name, uuid, size, pool, backing, time.time())
        with self.transaction() as db:
            db.execute(
                "INSERT INTO lu (name, uuid, size, pool, backing, created) VALUES (?,?,?,?,?,?)",
                (name, uuid, size, pool, backing, record.created),
            )
        return record

    def set_lu_size(self, name: str, size: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE lu SET size=? WHERE name=?", (size, name))

    def remove_lu(self, name: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM lu WHERE name=?", (name,))

    # ---------------------------------------------------------------- pools

    def members(self, lu: str) -> list[MemberRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT idx, state, gen, last_used, pending FROM member WHERE lu=? ORDER BY idx",
                (lu,),
            ).fetchall()
        return [MemberRecord(*row) for row in rows]

    def generations(self, lu: str, include_recycled: bool = False) -> list[GenerationRecord]:
        query = (
            "SELECT gen, member, trigger_id, seq, label, source, created, pinned, state, changes"
            " FROM generation WHERE lu=?"
        )
        if not include_recycled:
            query += " AND state='ready'"
        with self._lock:
            rows = self._db.execute(query + " ORDER BY gen", (lu,)).fetchall()
        return [GenerationRecord(*row[:7], bool(row[7]), *row[8:]) for row in rows]

    def lu_state(self, lu: str) -> tuple[int, bytes | None]:
        with self._lock:
            row = self._db.execute(
                "SELECT last_seq, open_changes FROM lu WHERE name=?", (lu,)
            ).fetchone()
        return (row[0], row[1]) if row else (0, None)

    def add_members(self, lu: str, indexes: list[int]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO member (lu, idx, state) VALUES (?, ?, 'spare')",
                [(lu, i) for i in indexes],
            )

    def remove_members(self, lu: str, indexes: list[int]) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM member WHERE lu=? AND idx=?", [(lu, i) for i in indexes])

    def save_pool(
        self,
        lu: str,
        members: list[MemberRecord],
        last_seq: int,
        open_changes: bytes | None,
        new_generations: list[GenerationRecord] = (),  # type: ignore[assignment]
        recycled: list[int] = (),  # type: ignore[assignment]
        prune_changes_upto: int | None = None,
    ) -> None:
        """One atomic step: member states, new generations, recycled ones."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE member SET state=?, gen=?, last_used=?, pending=? WHERE lu=? AND idx=?",
                [(m.state, m.gen, m.last_used, m.pending, lu, m.idx) for m in members],
            )
            for g in new_generations:
                db.execute(
                    "INSERT INTO generation (lu, gen, member, trigger_id, seq, label, source,"
                    " created, pinned, state, changes) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (lu, g.gen, g.member, g.trigger_id, g.seq, g.label, g.source, g.created,
                     int(g.pinned), g.state, g.changes),
                )
            db.executemany(
                "UPDATE generation SET state='recycled' WHERE lu=? AND gen=?",
                [(lu, gen) for gen in recycled],
            )
            if prune_changes_upto is not None:
                db.execute(
                    "UPDATE generation SET changes=NULL WHERE lu=? AND gen<=?"
                    " AND state='recycled' AND changes IS NOT NULL",
                    (lu, prune_changes_upto),
                )
            db.execute(
                "UPDATE lu SET last_seq=max(last_seq, ?), open_changes=? WHERE name=?",
                (last_seq, open_changes, lu),
            )

    def mark_generation(self, lu: str, gen: int, state: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE generation SET state=? WHERE lu=? AND gen=?", (state, lu, gen))

    def mark_recycled(self, lu: str, gens: list[int]) -> None:
        with self.transaction() as db:
            db.executemany("UPDATE generation SET state='recycled' WHERE lu=? AND gen=?",
                           [(lu, g) for g in gens])

    def set_pinned(self, lu: str, gen: int, pinned: bool) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE generation SET pinned=? WHERE lu=? AND gen=?", (int(pinned), lu, gen)
            )

    def set_pool_size(self, lu: str, pool: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE lu SET pool=? WHERE name=?", (pool, lu))

    def log_trigger(
        self, trigger_id: str, lus: list[str], seqs: list[int], source: str, label: str,
        received: float, outcome: str, detail: str = "", merge: bool = False,
    ) -> None:
        """``merge``: one LU of a trigger logged LU by LU (a consistency group's split
        completed at start-up): added to the trigger's row if there is one."""
        conflict = (" ON CONFLICT(id) DO UPDATE SET lus = trigger_log.lus || ',' ||"
                    " excluded.lus, seqs = trigger_log.seqs || ',' || excluded.seqs"
                    if merge else "")
        with self.transaction() as db:
            db.execute(
                "INSERT INTO trigger_log (id, lus, seqs, source, label, received, outcome, detail)"
                " VALUES (?,?,?,?,?,?,?,?)" + conflict,
                (trigger_id, ",".join(lus), ",".join(map(str, seqs)), source, label, received,
                 outcome, detail),
            )

    def trigger_answered(self, trigger_id: str) -> bool:
        """Was this trigger's split committed and answered (not completed at start-up)?"""
        with self._lock:
            rows = self._db.execute(
                "SELECT outcome, detail FROM trigger_log WHERE id = ?", (trigger_id,)).fetchall()
        return any(outcome == "ok" and detail != COMPLETED_AT_START_UP
                   for outcome, detail in rows)

    def triggers(self, lu: str | None = None, limit: int = 100) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, lus, seqs, source, label, received, outcome, detail FROM trigger_log"
                " ORDER BY received DESC LIMIT ?", (limit * 10 if lu else limit,),
            ).fetchall()
        keys = ("id", "lus", "seqs", "source", "label", "received", "outcome", "detail")
        out = [dict(zip(keys, row, strict=True)) for row in rows]
        if lu is not None:
            out = [t for t in out if lu in t["lus"].split(",")][:limit]
        return out

    # ------------------------------------------------------------ replication

    def replicas(self) -> list[tuple]:
        with self._lock:
            return self._db.execute(
                "SELECT lu, device, nbd, remote, mode, journal_limit, acked_seq, state, dirty,"
                " options FROM replica ORDER BY lu").fetchall()

    def save_replica(self, lu: str, device: str, nbd: str, remote: str, mode: str,
                     journal_limit: int, acked_seq: int, state: str,
                     dirty: bytes | None, options: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO replica (lu, device, nbd, remote, mode, journal_limit, acked_seq,"
                " state, dirty, options) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(lu) DO UPDATE"
                " SET device=excluded.device, nbd=excluded.nbd, remote=excluded.remote,"
                " mode=excluded.mode, journal_limit=excluded.journal_limit,"
                " acked_seq=excluded.acked_seq, state=excluded.state, dirty=excluded.dirty,"
                " options=excluded.options",
                (lu, device, nbd, remote, mode, journal_limit, acked_seq, state, dirty, options))

    def replica_of(self, lu: str) -> tuple[str, str, str, float] | None:
        """(source device id, source LU, source LU uuid, since) if LU is a remote copy.

        Asked on every write a replication link applies, so it is answered from
        memory; any transaction forgets the answers (it may change them).
        """
        with self._lock:
            if lu in self._replica_of:
                return self._replica_of[lu]
            row = self._db.execute(
                "SELECT source_device, source_lu, source_uuid, since FROM replica_of WHERE lu=?",
                (lu,)).fetchone()
            self._replica_of[lu] = row
            return row

    def set_replica_of(self, lu: str, source_device: str, source_lu: str,
                       source_uuid: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO replica_of VALUES (?,?,?,?,?)",
                       (lu, source_device, source_lu, source_uuid, time.time()))

    def clear_replica_of(self, lu: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM replica_of WHERE lu=?", (lu,))

    def remove_replica(self, lu: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM replica WHERE lu=?", (lu,))

    def generation_by_trigger(self, lu: str, trigger_id: str) -> GenerationRecord | None:
        for g in self.generations(lu, include_recycled=True):
            if g.trigger_id == trigger_id:
                return g
        return None

    def add_origin(self, lu: str, gen: int, origin_seq: int, origin_gen: int | None) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO remote_origin VALUES (?,?,?,?)",
                       (lu, gen, origin_seq, origin_gen))

    def origins(self, lu: str) -> dict[int, tuple[int, int | None]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT gen, origin_seq, origin_gen FROM remote_origin WHERE lu=?",
                (lu,)).fetchall()
        return {gen: (seq, ogen) for gen, seq, ogen in rows}

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def close(self) -> None:
        with self._lock:
            self._db.close()
