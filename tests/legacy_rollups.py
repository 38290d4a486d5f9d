"""The rollups of the release before the bounded shape (issue 23), kept verbatim for the tests: its
schema (the migrations before 0009_rollup_days) and its roll-up, the
procedures `roll_up` and `prune_rollup_marks` of store/sql.py and `aggregate` of core/usage.py as that
release ran them. Tests build databases as that release wrote them and compare its statistics with
this release's over the same events."""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from lts_server.core.model import LicenseType
from lts_server.core.usage import BUCKETS, SLICE_MS, EventFacts, overuse_delta, tolerance
from lts_server.store import RollupResult
from lts_server.store.postgres import dialect
from lts_server.store.postgres import drive as pg_drive
from lts_server.store.sql import Exec, Many, Procedure, Query, _select_in
from lts_server.store.sqlite import drive as sqlite_drive
from lts_server.store.sqlite import migrations

OLD_SIZES = (*BUCKETS, "all")


def previous_migrations() -> list[tuple[int, str, str]]:
    """The migrations of the release before: those before the one that brought the bounded shape."""
    known = migrations()
    first_new = next(i for i, (_, name, _) in enumerate(known) if name.endswith("_rollup_days.sql"))
    return known[:first_new]


def create_sqlite(path: Path) -> None:
    """An empty database as the release before made it."""
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        for version, _, script in previous_migrations():
            con.executescript(f"BEGIN;\n{script}\nINSERT INTO schema_version (version) VALUES ({version});\nCOMMIT;")
    finally:
        con.close()


async def create_postgres(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        for version, _, script in previous_migrations():
            await conn.execute(dialect(script))
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
    finally:
        await conn.close()


def run_sqlite(path: Path, proc: Procedure) -> object:
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        result = sqlite_drive(con, proc)
        con.execute("COMMIT")
        return result
    finally:
        con.close()


async def run_postgres(url: str, proc: Procedure) -> object:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            return await pg_drive(conn, proc)
    finally:
        await conn.close()


def insert_events(rows: list[tuple]) -> Procedure[None]:
    """Events (at_ms, type, code, item_id, client_uuid, result, units, instances) as that release wrote them."""
    yield Many("INSERT INTO events (at_ms, type, code, item_id, client_uuid, result, units, instances)"
               " VALUES (?,?,?,?,?,?,?,?)", rows)


# -- core/usage.py of that release ------------------------------------------------------------------


@dataclass
class Counters:
    granted: int = 0
    refused: int = 0
    units: int = 0


Bucket = tuple[str, str, str, int]


def bucket_start(at_ms: int, size: str) -> int:
    if size == "all":
        return 0
    width = BUCKETS[size]
    return at_ms - at_ms % width


@dataclass
class Aggregate:
    counters: dict[Bucket, Counters] = field(default_factory=dict)
    devices: dict[Bucket, dict[str, int]] = field(default_factory=dict)


def aggregate(events: Iterable[EventFacts]) -> Aggregate:
    """Count per 3-minute bucket, then fold those into the larger sizes (cheaper than per event)."""
    counters: dict[Bucket, Counters] = defaultdict(Counters)
    devices: dict[Bucket, dict[str, int]] = defaultdict(dict)
    for e in events:
        if e.type == "handshake":
            granted: bool | None = e.result == 0
            active = granted
        elif e.type == "usage.record":
            granted, active = None, True
        else:
            continue
        slot = e.at_ms - e.at_ms % SLICE_MS
        for scope, key in (("code", e.code), ("item", e.item_id)):
            if not key:
                continue
            k = (scope, key, "3m", slot)
            c = counters[k]
            if granted is True:
                c.granted += 1
            elif granted is False:
                c.refused += 1
            elif e.units:
                c.units += e.units
            if active and e.client_uuid:
                seen = devices[k]
                instances = (e.instances or 0) if scope == "item" else 0
                if seen.get(e.client_uuid, -1) < instances:
                    seen[e.client_uuid] = instances
    agg = Aggregate(dict(counters), dict(devices))
    for (scope, key, _, slot), c in counters.items():
        for size in OLD_SIZES[1:]:
            total = agg.counters.setdefault((scope, key, size, bucket_start(slot, size)), Counters())
            total.granted += c.granted
            total.refused += c.refused
            total.units += c.units
    for (scope, key, _, slot), seen in devices.items():
        for size in OLD_SIZES[1:]:
            merged = agg.devices.setdefault((scope, key, size, bucket_start(slot, size)), {})
            for client, instances in seen.items():
                if merged.get(client, -1) < instances:
                    merged[client] = instances
    return agg


# -- store/sql.py of that release --------------------------------------------------------------------


def roll_up(quantities: dict[str, tuple[str, int]], limit: int) -> Procedure[RollupResult]:
    """Fold the next events of the log into the rollups."""
    last = (yield Query("SELECT last_seq FROM rollup_state WHERE id = 1"))[0][0]
    # The end first, then the events up to it: on PostgreSQL each statement sees what is committed when it
    # starts, so an end read after the events could pass events committed in between, never to be folded.
    end = (yield Query("SELECT COALESCE(MAX(seq), 0) FROM events"))[0][0]
    rows = yield Query("SELECT seq, at_ms, type, code, item_id, client_uuid, result, units, instances FROM events"
                       " WHERE seq > ? AND seq <= ? AND type IN ('handshake', 'usage.record') ORDER BY seq LIMIT ?",
                       (last, end, limit))
    if len(rows) == limit:
        end = rows[-1][0]
    result = yield from _apply_rollup([EventFacts(*r) for r in rows], quantities, end)
    yield Exec("UPDATE rollup_state SET last_seq = ? WHERE id = 1", (end,))
    return result


def _apply_rollup(events: list[EventFacts], quantities: dict[str, tuple[str, int]],
                  end: int) -> Procedure[RollupResult]:
    agg = aggregate(events)
    yield Many(
        "INSERT INTO rollups (scope, key, size, bucket_ms, granted, refused, units) VALUES (?,?,?,?,?,?,?)"
        " ON CONFLICT (scope, key, size, bucket_ms) DO UPDATE SET granted = rollups.granted + excluded.granted,"
        " refused = rollups.refused + excluded.refused, units = rollups.units + excluded.units",
        [(*k, c.granted, c.refused, c.units) for k, c in agg.counters.items()],
    )
    overuse: dict[str, int] = {}
    for (scope, key, size, bucket), seen in agg.devices.items():
        bucket_key = (scope, key, size, bucket)
        # Who of these was already counted in the bucket, with the instances recorded for it.
        known: dict[str, int] = dict((yield from _select_in(
            "SELECT client_uuid, instances FROM rollup_devices WHERE scope = ? AND key = ? AND size = ?"
            " AND bucket_ms = ? AND client_uuid", list(seen), *bucket_key)))
        fresh = [(client, instances) for client, instances in seen.items() if client not in known]
        if fresh:
            yield Many("INSERT INTO rollup_devices (scope, key, size, bucket_ms, client_uuid, instances)"
                       " VALUES (?,?,?,?,?,?)", [(*bucket_key, client, n) for client, n in fresh])
        kind = quantities.get(key, ("", 0))[0] if scope == "item" and size == "3m" else ""
        added = 0
        if kind == LicenseType.PER_CONCURRENT_INSTANCE:
            # A server seen by its handshake first (no instances), then by its report, adds the difference.
            grown = [(client, n, known[client]) for client, n in seen.items() if client in known and n > known[client]]
            if grown:
                yield Many("UPDATE rollup_devices SET instances = ? WHERE scope = ? AND key = ? AND size = ?"
                           " AND bucket_ms = ? AND client_uuid = ?",
                           [(n, *bucket_key, client) for client, n, _ in grown])
            added = sum(n for _, n in fresh) + sum(n - before for _, n, before in grown)
        if kind in (LicenseType.PER_CONCURRENT_INSTANCE, LicenseType.PER_CONCURRENT_DEVICE):
            grows = added if kind == LicenseType.PER_CONCURRENT_INSTANCE else len(fresh)
            if grows:
                # Instance- (or device-) slices beyond the quantity are the item's exceptions.
                column = "instances" if kind == LicenseType.PER_CONCURRENT_INSTANCE else "devices"
                row = yield Query(f"SELECT {column} FROM rollups WHERE scope = ? AND key = ? AND size = ?"
                                  " AND bucket_ms = ?", bucket_key)
                before = row[0][0] if row else 0
                overuse[key] = overuse.get(key, 0) + overuse_delta(before, before + grows, quantities[key][1])
        if fresh or added:
            yield Exec(
                "INSERT INTO rollups (scope, key, size, bucket_ms, devices, instances) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT (scope, key, size, bucket_ms) DO UPDATE SET"
                " devices = rollups.devices + excluded.devices, instances = rollups.instances + excluded.instances",
                (*bucket_key, len(fresh), added),
            )
    overuse = {k: v for k, v in overuse.items() if v}
    for item_id, delta in overuse.items():
        # The overuse counter moves with the rollup, in its transaction.
        yield Exec(
            "UPDATE items SET overuse_used = overuse_used + ?,"
            " overused = CASE WHEN overuse_used + ? >= ? THEN 1 ELSE overused END WHERE item_id = ?",
            (delta, delta, tolerance(quantities[item_id][1]), item_id),
        )
    return RollupResult(len(events), end, overuse)


def prune_rollup_marks(before_ms: int) -> Procedure[int]:
    """Forget who was active in buckets that ended before before_ms (no report can reach them any more)."""
    total = 0
    for size, width in BUCKETS.items():
        total += yield Exec("DELETE FROM rollup_devices WHERE size = ? AND bucket_ms + ? <= ?", (size, width, before_ms))
    return total

