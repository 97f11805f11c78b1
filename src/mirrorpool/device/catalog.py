"""Metadata in SQLite (WAL, synchronous=FULL): what LUs exist and how they are made."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS lu (
    name TEXT PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL CHECK (size > 0),
    pool INTEGER NOT NULL CHECK (pool >= 0),
    backing TEXT,
    created REAL NOT NULL
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


class Catalog:
    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
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
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

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

    def close(self) -> None:
        with self._lock:
            self._db.close()
