"""The SQLite catalog: what LUs exist, kept across reopen."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from mirrorpool.device.catalog import SCHEMA_VERSION, Catalog, LuRecord


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "catalog.sqlite"


def test_new_catalog_is_empty(db_path: Path) -> None:
    cat = Catalog(str(db_path))
    try:
        assert cat.lus() == []
    finally:
        cat.close()
    assert db_path.exists()


def test_add_returns_the_record_and_lists_it(db_path: Path) -> None:
    cat = Catalog(str(db_path))
    before = time.time()
    rec = cat.add_lu("alpha", "uuid-a", 1 << 20, 3, None)
    try:
        assert rec == LuRecord("alpha", "uuid-a", 1 << 20, 3, None, rec.created)
        assert before <= rec.created <= time.time()
        assert cat.lus() == [rec]
    finally:
        cat.close()


def test_list_is_sorted_by_name(db_path: Path) -> None:
    cat = Catalog(str(db_path))
    try:
        for name in ["zeta", "alpha", "mid"]:
            cat.add_lu(name, f"uuid-{name}", 4096, 0, None)
        assert [r.name for r in cat.lus()] == ["alpha", "mid", "zeta"]
    finally:
        cat.close()


def test_remove(db_path: Path) -> None:
    cat = Catalog(str(db_path))
    try:
        cat.add_lu("a", "u1", 4096, 0, None)
        cat.add_lu("b", "u2", 4096, 0, None)
        cat.remove_lu("a")
        assert [r.name for r in cat.lus()] == ["b"]
        cat.remove_lu("missing")  # no error, nothing changes
        assert [r.name for r in cat.lus()] == ["b"]
    finally:
        cat.close()


def test_everything_persists_across_reopen(db_path: Path) -> None:
    cat = Catalog(str(db_path))
    a = cat.add_lu("a", "u1", 1 << 20, 3, None)
    b = cat.add_lu("b", "u2", 2 << 20, 0, "/srv/disk.img")
    cat.add_lu("gone", "u3", 4096, 1, None)
    cat.set_lu_size("a", 4 << 20)
    cat.remove_lu("gone")
    cat.close()

    again = Catalog(str(db_path))
    try:
        assert again.lus() == [
            LuRecord("a", "u1", 4 << 20, 3, None, a.created),
            LuRecord("b", "u2", 2 << 20, 0, "/srv/disk.img", b.created),
        ]
    finally:
        again.close()


def test_duplicate_name_or_uuid_refused_and_nothing_changes(db_path: Path) -> None:
    cat = Catalog(str(db_path))
    try:
        first = cat.add_lu("a", "u1", 4096, 0, None)
        with pytest.raises(sqlite3.IntegrityError):
            cat.add_lu("a", "u2", 8192, 1, None)
        with pytest.raises(sqlite3.IntegrityError):
            cat.add_lu("b", "u1", 8192, 1, None)
        assert cat.lus() == [first]
        # the failed transactions were rolled back: the catalog still takes changes
        cat.add_lu("b", "u2", 8192, 1, None)
        assert [r.name for r in cat.lus()] == ["a", "b"]
    finally:
        cat.close()


@pytest.mark.parametrize(("size", "pool"), [(0, 0), (-512, 0), (4096, -1)])
def test_constraints_refuse_impossible_records(db_path: Path, size: int, pool: int) -> None:
    cat = Catalog(str(db_path))
    try:
        with pytest.raises(sqlite3.IntegrityError):
            cat.add_lu("a", "u1", size, pool, None)
        assert cat.lus() == []
    finally:
        cat.close()


def test_transaction_rolls_back_on_error(db_path: Path) -> None:
    cat = Catalog(str(db_path))
    try:
        with pytest.raises(RuntimeError), cat.transaction() as db:
            db.execute(
                "INSERT INTO lu (name, uuid, size, pool, backing, created) "
                "VALUES ('x', 'ux', 4096, 0, NULL, 0)"
            )
            raise RuntimeError("boom")
        assert cat.lus() == []
    finally:
        cat.close()


def test_records_schema_version_and_refuses_newer(db_path: Path) -> None:
    Catalog(str(db_path)).close()
    with sqlite3.connect(db_path) as db:
        (value,) = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        assert int(value) == SCHEMA_VERSION
        db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION + 1),))
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        Catalog(str(db_path))


def test_uses_wal_and_full_sync(db_path: Path) -> None:
    cat = Catalog(str(db_path))
    try:
        with cat.transaction() as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        cat.close()


def test_meta_and_pool_size_persist(db_path: Path) -> None:
    cat = Catalog(str(db_path))
    cat.add_lu("a", "u1", 4096, 3, None)
    assert cat.get_meta("clean") is None
    cat.set_meta("clean", "0")
    cat.set_meta("clean", "1")  # replaced, not added
    cat.set_pool_size("a", 5)
    cat.close()
    again = Catalog(str(db_path))
    try:
        assert again.get_meta("clean") == "1"
        assert again.lus()[0].pool == 5
    finally:
        again.close()


def test_removing_an_lu_removes_its_members(db_path: Path) -> None:
    cat = Catalog(str(db_path))
    try:
        cat.add_lu("a", "u1", 4096, 2, None)
        cat.add_lu("b", "u2", 4096, 1, None)
        cat.add_members("a", [0, 1])
        cat.add_members("b", [0])
        assert [(m.idx, m.state) for m in cat.members("a")] == [(0, "spare"), (1, "spare")]
        cat.remove_lu("a")
        assert cat.members("a") == []
        assert [m.idx for m in cat.members("b")] == [0]
        # a re-created LU of the same name starts with no members
        cat.add_lu("a", "u3", 4096, 0, None)
        assert cat.members("a") == []
    finally:
        cat.close()


def test_members_of_an_unknown_lu_are_refused(db_path: Path) -> None:
    cat = Catalog(str(db_path))
    try:
        with pytest.raises(sqlite3.IntegrityError):
            cat.add_members("ghost", [0])
    finally:
        cat.close()


def test_replica_of_follows_every_change(db_path: Path) -> None:
    catalog = Catalog(str(db_path))
    catalog.add_lu("copy", "u1", 1 << 20, 3, None)
    assert catalog.replica_of("copy") is None
    catalog.set_replica_of("copy", "dev-a", "vm1", "uuid-a")
    assert catalog.replica_of("copy")[:3] == ("dev-a", "vm1", "uuid-a")
    catalog.clear_replica_of("copy")
    assert catalog.replica_of("copy") is None
    catalog.set_replica_of("copy", "dev-a", "vm1", "uuid-a")
    assert catalog.replica_of("copy") is not None
    catalog.remove_lu("copy")  # the row goes with the LU
    assert catalog.replica_of("copy") is None
    # a transaction that fails changes nothing, the answer included
    catalog.add_lu("copy", "u2", 1 << 20, 3, None)
    with pytest.raises(RuntimeError), catalog.transaction():
        catalog.set_replica_of("copy", "dev-b", "vm2", "uuid-b")
        assert catalog.replica_of("copy") is not None
        raise RuntimeError("rolled back")
    assert catalog.replica_of("copy") is None
    catalog.close()


def test_pruning_change_sets_visits_only_rows_that_hold_one(db_path: Path) -> None:
    """Recycled generations stay as history; a split's prune must not scan them all."""
    catalog = Catalog(str(db_path))
    catalog.add_lu("lu", "u1", 1 << 20, 2, None)
    statements: list[str] = []
    catalog._db.set_trace_callback(statements.append)
    catalog.save_pool("lu", [], 7, None, prune_changes_upto=5)
    catalog._db.set_trace_callback(None)
    prunes = [s for s in statements if s.startswith("UPDATE generation SET changes=NULL")]
    assert prunes, statements
    for statement in prunes:
        plan = catalog._db.execute("EXPLAIN QUERY PLAN " + statement).fetchall()
        assert "generation_with_changes" in " ".join(str(row) for row in plan), plan


def test_a_group_trigger_completed_lu_by_lu_at_start_up_is_one_row(db_path: Path) -> None:
    """A crash that cut a consistency group's split short: start-up completes it LU by
    LU, each logging the same trigger id (a second plain insert would fail)."""
    cat = Catalog(str(db_path))
    try:
        for lu, seq in (("a", 7), ("b", 9)):
            cat.log_trigger("t1", [lu], [seq], "api", "x", 1.0, "ok", "completed",
                            merge=True)
        (row,) = cat.triggers()
        assert (row["id"], row["lus"], row["seqs"]) == ("t1", "a,b", "7,9")
        with pytest.raises(sqlite3.IntegrityError):
            cat.log_trigger("t1", ["c"], [1], "api", "x", 1.0, "ok")
    finally:
        cat.close()
