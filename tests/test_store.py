"""The stores: migrations on both backends; SQLite's durability settings and clear errors when locked or full."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lts_server.store import Event, SchemaTooNew, Store, StoreFull, StoreUnavailable, WriteBatch, sql
from lts_server.store.sqlite import SQLiteStore, migrations
from tests.conftest import query

NewStore = Callable[[], Awaitable[Store]]

AT = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


async def test_migrates_an_empty_database(new_store: NewStore) -> None:
    store = await new_store()
    await store.open()
    try:
        assert await store.schema_version() == len(migrations())
        assert await store.ready()
        for table in ("licenses", "items", "handshake_codes", "code_items", "seats", "events", "schema_version"):
            assert await query(store, f"SELECT COUNT(*) FROM {table}") == [(len(migrations()),)
                                                                          if table == "schema_version" else (0,)]
    finally:
        await store.close()


async def test_rows_among_more_values_than_one_in_list_holds(new_store: NewStore) -> None:
    # sql._select_in (the rollups' device marks and day rows, device rows, item statuses): every row whose
    # column is among the values, and no other, for text and for bigint values, over more values than one
    # SQLite IN list takes; PostgreSQL gets them as one array (store/postgres.py among).
    store = await new_store()
    await store.open()
    try:
        await query(store, "INSERT INTO rollup_clients (client_uuid, id, marks) SELECT 'd' || g, g, ? FROM"
                           " (WITH RECURSIVE n(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM n WHERE g < 3000)"
                           " SELECT g FROM n) AS numbers", b"m")
        await query(store, "INSERT INTO rollup_days (day, client, marks) SELECT day, id, marks FROM rollup_clients,"
                           " (SELECT 20000 AS day UNION ALL SELECT 20001) AS days")
        wanted = [f"d{n}" for n in range(1, 3001, 5)] + ["nobody"]
        assert len(wanted) > sql.IN_CHUNK
        rows = await store._call(sql._select_in("SELECT client_uuid, id FROM rollup_clients WHERE client_uuid",
                                                set(wanted)))
        assert sorted(rows) == sorted((c, int(c[1:])) for c in wanted[:-1])
        ids = list(range(2, 3001, 3)) + [9_000_000_000]  # one beyond any 32-bit integer, in no row
        rows = await store._call(sql._select_in("SELECT client, day FROM rollup_days WHERE day = ? AND client",
                                                ids, 20001, kind="bigint"))
        assert sorted(rows) == [(n, 20001) for n in ids[:-1]]
        assert await store._call(sql._select_in("SELECT id FROM rollup_clients WHERE client_uuid", set())) == []
    finally:
        await store.close()


@pytest.mark.sqlite_only
async def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    await store.close()
    con = sqlite3.connect(tmp_path / "db.sqlite3")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_reopening_keeps_data_and_applies_nothing_twice(new_store: NewStore) -> None:
    store = await new_store()
    await store.open()
    await store.write(WriteBatch(events=[Event(at=AT, type="test")], at=AT))
    await store.close()
    await store.open()
    try:
        events = [e async for e in store.events(_all())]
        assert [e.event.type for e in events] == ["test"]
        assert await query(store, "SELECT COUNT(*) FROM schema_version") == [(len(migrations()),)]
    finally:
        await store.close()


def _all():  # noqa: ANN202
    from lts_server.store import EventQuery

    return EventQuery()


async def test_refuses_a_newer_schema(new_store: NewStore) -> None:
    store = await new_store()
    await store.open()
    await query(store, "INSERT INTO schema_version (version) VALUES (999)")
    await store.close()
    with pytest.raises(SchemaTooNew, match="schema version 999.*knows versions up to"):
        await store.open()


@pytest.mark.sqlite_only
async def test_locked_database_fails_fast_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = SQLiteStore(path, busy_timeout_ms=300)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.write(WriteBatch(events=[Event(at=AT, type="x")], at=AT))
        assert time.monotonic() - started < 5
    finally:
        other.execute("ROLLBACK")
        other.close()
    # Once the lock is gone the same store works again and nothing half-written remains.
    await store.write(WriteBatch(events=[Event(at=AT, type="y")], at=AT))
    assert [e.event.type async for e in store.events(_all())] == ["y"]
    await store.close()


@pytest.mark.sqlite_only
async def test_opening_a_locked_database_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA journal_mode = DELETE")
    other.execute("BEGIN EXCLUSIVE")
    other.execute("CREATE TABLE t (x)")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            await SQLiteStore(path, busy_timeout_ms=200).open()
    finally:
        other.execute("ROLLBACK")
        other.close()


@pytest.mark.sqlite_only
async def test_full_disk_is_a_clear_error_and_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = SQLiteStore(path)
    await store.open()
    await store.write(WriteBatch(events=[Event(at=AT, type="kept")], at=AT))
    # Cap the file at its current size: the next growth is SQLITE_FULL, as on a full disk.
    async with store.db.execute("PRAGMA page_count") as cur:
        pages = (await cur.fetchone())[0]
    await store.db.execute(f"PRAGMA max_page_count = {pages}")
    big = [Event(at=AT, type="big", detail={"pad": "x" * 4000}) for _ in range(50)]
    with pytest.raises(StoreFull, match="full"):
        await store.write(WriteBatch(events=big, at=AT))
    assert [e.event.type async for e in store.events(_all())] == ["kept"]
    await store.close()


def test_migration_files_are_numbered_without_gaps() -> None:
    found = migrations()
    assert [v for v, _, _ in found] == list(range(1, len(found) + 1))


async def test_the_archive_horizon_takes_every_event_of_the_last_millisecond_before_it(new_store: NewStore) -> None:
    """A batch stamps all its events with one time: the archive's bound is the highest number among the newest
    events before the horizon, whatever order the database keeps equal times in (PostgreSQL: the rows' order in
    the table; the rows below are written out of number order)."""
    store = await new_store()
    await store.open()
    try:
        at = 1_767_000_000_000
        for seq, at_ms in ((100, at), (50, at), (200, at + 3_600_000)):
            await query(store, "INSERT INTO events (seq, at_ms, type) VALUES (?, ?, 'handshake')", seq, at_ms)
        while (await store.roll_up({})).processed:
            pass
        horizon = await store.archive_horizon(at + 1)
        assert horizon.upto == 100  # both events of that millisecond; the newest event (200) stays
    finally:
        await store.close()
