"""A year of a fleet handshaking hourly: what it leaves on disk, per device and day.

    .venv/bin/python bench/disk.py [--devices 10000] [--days 365] [--stores sqlite,postgresql]
        [--retain-days 7] [--archive-every 30] [--keep DIR]

Each device (a random UUID) holds one seat of a per-device item and refreshes it every hour, a few
seconds after the same minute each time (devices spread over the hour). Day by day, with the store's
own code and the daemon's settings (stats.hourly_days 90, stats.daily_days 730):

- the day's events are written as a refresh writes them (`seat.refreshed` with its expiry, then
  `handshake`), hour by hour, with bulk SQL (the ledger is not the subject here);
- the rollup job folds each hour's as the daemon does, in pages of 500 events (`Store.roll_up`), and the
  prune runs at the end of the day (`Server.prune_rollups`: day rows past 31 days, counters past their tier);
- on PostgreSQL, VACUUM after each hour of the tables the rollups and refreshes rewrite, and after each day
  of the event log: what autovacuum does over a real day, which it cannot over a simulated one of seconds;
- device events older than `--retain-days` leave the log: the daemon's archiver (lts_server/archive.py:
  gzip'd NDJSON, fsynced) every `--archive-every`-th day, and on the other days a bulk DELETE of the same
  events with the bytes counted at the archiver's measured bytes per event (its work is the same every
  day; archiving all of them costs 25 s a day for 10,000 devices on this machine).

Printed: per table and index, the bytes at the end; per device and day, what the rollups and the live
event log hold in steady state and what the archives grow by; and what a fleet of a million devices
needs for a year. SQLite sizes from its `dbstat` table; PostgreSQL from `pg_total_relation_size` after
VACUUM (ANALYZE), the space autovacuum would reuse counted as used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import pg  # noqa: E402  (tests/pg.py: a throwaway PostgreSQL server)

from lts_server.archive import Archiver  # noqa: E402
from lts_server.core.usage import DAY_MS, MARKS_DAYS  # noqa: E402
from lts_server.server import PRUNE_PAGE, ROLLUP_PAGE  # noqa: E402
from lts_server.store import Store  # noqa: E402
from lts_server.store.postgres import PostgresStore  # noqa: E402
from lts_server.store.sql import ARCHIVED_TYPES  # noqa: E402
from lts_server.store.sqlite import SQLiteStore  # noqa: E402

CODE, ITEM = "216998-FLEET", "FLEET-1"
HOUR_MS = 3_600_000
HOURLY_DAYS, DAILY_DAYS = 90, 730
FLEET = 1_000_000
# The tables of each part; the rest (licenses, codes, imports, admin) is a few kilobytes whatever the fleet.
PARTS = {
    "rollups": ("rollups", "rollup_days", "rollup_clients", "rollup_keys", "rollup_devices"),
    "events": ("events",),
    "seats": ("seats", "authorizations"),
}


def device_uuids(n: int) -> list[str]:
    rng = random.Random(23)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


class Fleet:
    """One store's database and the fleet's traffic written into it."""

    def __init__(self, store: Store, n: int, start_ms: int, folder: Path) -> None:
        self.store, self.n, self.start_ms, self.folder = store, n, start_ms, folder
        self.sqlite = store.path if isinstance(store, SQLiteStore) else None
        self.url = store.url if isinstance(store, PostgresStore) else None

    async def sql(self, statements: list[tuple[str, tuple]]) -> list[list[tuple[Any, ...]]]:
        """Statements with `?` placeholders, in one transaction on a connection of their own."""
        out: list[list[tuple[Any, ...]]] = []
        if self.url:
            from lts_server.store.postgres import numbered
            conn = await asyncpg.connect(self.url)
            try:
                async with conn.transaction():
                    for s, args in statements:
                        out.append([tuple(r) for r in await conn.fetch(numbered(s), *args)])
            finally:
                await conn.close()
            return out
        con = sqlite3.connect(self.sqlite, isolation_level=None)  # type: ignore[arg-type]
        try:
            con.execute("BEGIN IMMEDIATE")
            for s, args in statements:
                out.append(con.execute(s, args).fetchall())
            con.execute("COMMIT")
        finally:
            con.close()
        return out

    async def setup(self) -> None:
        """The devices (a table of this bench's own), their seats and authorizations (held all year)."""
        uuids = device_uuids(self.n)
        year = 365 * DAY_MS
        if self.url:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute("CREATE TABLE bench_devices (i INTEGER PRIMARY KEY, client TEXT NOT NULL)")
                await conn.copy_records_to_table("bench_devices", records=list(enumerate(uuids)))
            finally:
                await conn.close()
        else:
            con = sqlite3.connect(self.sqlite, isolation_level=None)  # type: ignore[arg-type]
            con.execute("CREATE TABLE bench_devices (i INTEGER PRIMARY KEY, client TEXT NOT NULL)")
            con.execute("BEGIN")
            con.executemany("INSERT INTO bench_devices VALUES (?, ?)", list(enumerate(uuids)))
            con.execute("COMMIT")
            con.close()
        await self.sql([
            ("INSERT INTO seats (item_id, client_uuid, granted_ms, refreshed_ms, expires_ms)"
             " SELECT ?, client, ?, ?, ? FROM bench_devices", (ITEM, self.start_ms, self.start_ms, self.start_ms + year)),
            ("INSERT INTO authorizations (code, client_uuid, item_id, instances, granted_ms, expires_ms)"
             " SELECT ?, client, ?, 1, ?, ? FROM bench_devices", (CODE, ITEM, self.start_ms, self.start_ms + year)),
        ])

    async def write_hour(self, hour_ms: int) -> None:
        """Every device refreshes once in the hour, device i at i/n of it: its two events, in order."""
        if self.sqlite:
            at = f"? + i * {HOUR_MS} / {self.n}"
            expiry = "strftime('%Y-%m-%dT%H:%M:%S', (at + ?) / 1000, 'unixepoch') || '+00:00'"
        else:
            at = f"?::bigint + i::bigint * {HOUR_MS} / {self.n}"
            expiry = ("to_char(to_timestamp((at + ?::bigint) / 1000) AT TIME ZONE 'UTC',"
                      " 'YYYY-MM-DD\"T\"HH24:MI:SS') || '+00:00'")
        await self.sql([(
            "INSERT INTO events (at_ms, type, code, item_id, client_uuid, product, deployment_type, result, detail,"
            " units, instances) SELECT at, type, ?, ?, client, product, deployment, result,"
            f" CASE WHEN k = 0 THEN '{{\"expiresAt\":\"' || {expiry} || '\"}}' END, NULL, NULL FROM"
            f" (SELECT i, client, {at} AS at FROM bench_devices) d,"
            " (SELECT 0 AS k, 'seat.refreshed' AS type, NULL AS product, NULL AS deployment, NULL AS result"
            "  UNION ALL SELECT 1, 'handshake', 'barcode-reader', 'browser', 0) t ORDER BY i, k",
            (CODE, ITEM, 365 * DAY_MS, hour_ms))])

    async def roll_up(self) -> int:
        total = 0
        while (done := (await self.store.roll_up({ITEM: ("per-device", self.n)}, ROLLUP_PAGE)).processed):
            total += done
        return total

    async def prune(self, now_ms: int) -> None:
        """What Server.prune_rollups does with the default tiers."""
        while await self.store.prune_marks(now_ms // DAY_MS - MARKS_DAYS, PRUNE_PAGE) == PRUNE_PAGE:
            pass
        horizons = {"3m": now_ms - HOURLY_DAYS * DAY_MS, "2h": now_ms - HOURLY_DAYS * DAY_MS,
                    "1d": now_ms - DAILY_DAYS * DAY_MS}
        while await self.store.prune_counters(horizons, PRUNE_PAGE) >= PRUNE_PAGE:
            pass

    async def drop_old_events(self, before_ms: int) -> int:
        """What an archive run deletes (store/sql.py archive_horizon: folded, not the newest, before the horizon).

        Folded: at or before the rollups' (tx, seq) position. On SQLite tx is always 0 and that is seq <= last_seq;
        on PostgreSQL the position is (horizon xid, 0) and seq alone says nothing (archivable_page's bound)."""
        types = ",".join(f"'{t}'" for t in ARCHIVED_TYPES)
        where = (f"at_ms < ? AND type IN ({types}) AND (tx, seq) <= (SELECT last_tx, last_seq FROM rollup_state)"
                 " AND seq < (SELECT MAX(seq) FROM events)")
        rows = await self.sql([(f"SELECT COUNT(*) FROM events WHERE {where}", (before_ms,)),
                               (f"DELETE FROM events WHERE {where}", (before_ms,))])
        return rows[0][0][0]

    async def vacuum(self, tables: tuple[str, ...]) -> None:
        """PostgreSQL: what autovacuum does in a real day (it cannot keep up with days that last seconds):
        the tables the rollups rewrite every hour, and the event log once a day after its deletes."""
        if self.url:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute(f"VACUUM {', '.join(tables)}")
            finally:
                await conn.close()

    async def space(self) -> dict[str, int]:
        """Bytes per table, its indexes included."""
        if self.url:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute("VACUUM (ANALYZE)")
                return {r[0]: r[1] for r in await conn.fetch(
                    "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n"
                    " ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'")}
            finally:
                await conn.close()
        con = sqlite3.connect(self.sqlite)  # type: ignore[arg-type]
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            owner = {name: table for name, table in con.execute("SELECT name, tbl_name FROM sqlite_master")}
            out: dict[str, int] = {}
            for name, size in con.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
                table = owner.get(name, name)
                out[table] = out.get(table, 0) + size
            free = con.execute("PRAGMA freelist_count").fetchone()[0] * con.execute("PRAGMA page_size").fetchone()[0]
            out["(free pages)"] = free
            return out
        finally:
            con.close()

    async def count(self, table: str) -> int:
        return (await self.sql([(f"SELECT COUNT(*) FROM {table}", ())]))[0][0][0]


def gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


async def run_store(args: argparse.Namespace, name: str, work: Path, server: pg.PgServer | None) -> dict[str, Any]:
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if name == "postgresql":
        assert server is not None
        conn = await asyncpg.connect(server.url())
        await conn.execute("DROP DATABASE IF EXISTS disk_bench")
        await conn.execute("CREATE DATABASE disk_bench")
        await conn.close()
        store: Store = PostgresStore(server.url("disk_bench"))
    else:
        store = SQLiteStore(folder / "lts-server.sqlite3")
    await store.open()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    start_ms = int(start.timestamp() * 1000)
    fleet = Fleet(store, args.devices, start_ms, folder)
    archiver = Archiver(store, folder / "archive")
    await fleet.setup()
    timings = {"write": 0.0, "fold": 0.0, "prune": 0.0, "archive": 0.0, "vacuum": 0.0}
    archived = archive_bytes = dropped = folded = 0
    checkpoints: dict[int, dict[str, int]] = {}
    started = time.perf_counter()
    try:
        for day in range(args.days):
            day_ms = start_ms + day * DAY_MS
            t0 = time.perf_counter()
            for hour in range(24):
                t = time.perf_counter()
                await fleet.write_hour(day_ms + hour * HOUR_MS)
                timings["write"] += time.perf_counter() - t
                t = time.perf_counter()
                folded += await fleet.roll_up()
                timings["fold"] += time.perf_counter() - t
                t = time.perf_counter()
                await fleet.vacuum(("rollup_days", "rollup_clients", "rollups", "seats", "authorizations"))
                timings["vacuum"] += time.perf_counter() - t
            now_ms = day_ms + DAY_MS
            t = time.perf_counter()
            await fleet.prune(now_ms)
            timings["prune"] += time.perf_counter() - t
            t = time.perf_counter()
            before = now_ms - args.retain_days * DAY_MS
            if day >= args.retain_days:
                if day % args.archive_every == 0:
                    now = datetime.fromtimestamp(now_ms / 1000, UTC)
                    report = await archiver.run(datetime.fromtimestamp(before / 1000, UTC), now)
                    archived += report.events
                    archive_bytes += sum(r.bytes for r in report.files)
                else:
                    dropped += await fleet.drop_old_events(before)
            timings["archive"] += time.perf_counter() - t
            t = time.perf_counter()
            await fleet.vacuum(("events",))
            timings["vacuum"] += time.perf_counter() - t
            if day + 1 in (31, 91, 181, args.days):
                checkpoints[day + 1] = await fleet.space()
            if (day + 1) % 10 == 0 or day + 1 == args.days:
                print(f"  {name}: day {day + 1}/{args.days}, {time.perf_counter() - started:,.0f} s"
                      f" (this day {time.perf_counter() - t0:.1f} s)", flush=True)
        sizes = checkpoints[args.days]
        rows = {t: await fleet.count(t) for t in ("events", "rollup_days", "rollup_clients", "rollups")}
    finally:
        await store.close()
    per_event = archive_bytes / max(1, archived)
    return {"name": name, "sizes": sizes, "checkpoints": checkpoints, "rows": rows, "archived": archived,
            "archive_bytes": archive_bytes, "dropped": dropped, "per_event_gz": per_event, "folded": folded,
            "timings": timings}


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    n, days = args.devices, args.days
    sizes = r["sizes"]
    print(f"\n== {r['name']}: {n:,} devices handshaking hourly for {days} days, retain_days = {args.retain_days} ==")
    t = r["timings"]
    print(f"time: writing events {t['write']:.0f} s, folding {r['folded']:,} handshakes {t['fold']:.0f} s"
          f" ({t['fold'] / max(1, r['folded']) * 1e6:.1f} us each), pruning {t['prune']:.0f} s,"
          f" archiving and deleting {t['archive']:.0f} s, vacuuming (PostgreSQL) {t['vacuum']:.0f} s")
    print(f"  {'table (with its indexes)':28} {'bytes':>15} {'rows':>12} {'per device':>11}")
    for table, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        if size >= 50_000:
            rows = r["rows"].get(table)
            print(f"  {table:28} {size:15,} {rows if rows is not None else '':>12} {size / n:11.1f}")
    part = {p: sum(sizes.get(tb, 0) for tb in tables) for p, tables in PARTS.items()}
    marks = sizes.get("rollup_days", 0)
    print(f"  (at days {', '.join(str(d) for d in r['checkpoints'])}: rollups "
          + ", ".join(gb(sum(c.get(tb, 0) for tb in PARTS['rollups'])) for c in r["checkpoints"].values())
          + "; events " + ", ".join(gb(c.get("events", 0)) for c in r["checkpoints"].values()) + ")")
    # What the log holds after the day's archive run: retain_days days of events (the daemon's hourly run
    # holds at most an hour more).
    live_days = max(1, args.retain_days)
    events_per_device_day = part["events"] / (n * live_days)
    archive_total = r["archive_bytes"] + r["dropped"] * r["per_event_gz"]
    archive_days = max(1, days - args.retain_days)
    per_dd_archive = archive_total / (n * archive_days)
    print("per device and day (a device handshaking hourly: 24 handshakes, 48 events):")
    print(f"  rollups: {marks / (n * MARKS_DAYS):.1f} bytes a device-day in rollup_days (kept {MARKS_DAYS} days),"
          f" {sizes.get('rollup_clients', 0) / n:.1f} bytes a device in rollup_clients (for good),"
          f" counters {gb(sizes.get('rollups', 0))} whatever the fleet;"
          f" all rollups at the end {part['rollups'] / (n * days):.1f} bytes per device-day of the year")
    print(f"  live event log: {events_per_device_day:,.0f} bytes a device-day ({live_days} days held:"
          f" {part['events'] / max(1, r['rows']['events']):.0f} bytes an event with its indexes)")
    print(f"  archives: {per_dd_archive:,.0f} bytes a device-day ({r['per_event_gz']:.1f} bytes an event,"
          f" measured on {r['archived']:,} events the archiver wrote)")
    print(f"  seats and authorizations: {part['seats'] / n:.0f} bytes a device")
    year_archives = per_dd_archive * FLEET * 365
    live = (marks / (n * MARKS_DAYS) * MARKS_DAYS + sizes.get("rollup_clients", 0) / n + part["seats"] / n
            + events_per_device_day * live_days) * FLEET
    print(f"for {FLEET:,} devices, a year: live database {gb(live)} (rollups"
          f" {gb((marks / (n * MARKS_DAYS) * MARKS_DAYS + sizes.get('rollup_clients', 0) / n) * FLEET)},"
          f" seats {gb(part['seats'] / n * FLEET)}, event log {gb(events_per_device_day * live_days * FLEET)}),"
          f" archives {gb(year_archives)} a year")
    print(json.dumps({"name": r["name"], "devices": n, "days": days, "sizes": sizes, "rows": r["rows"],
                      "archived": r["archived"], "archive_bytes": r["archive_bytes"], "dropped": r["dropped"]}))


async def main(args: argparse.Namespace, work: Path) -> None:
    server = pg.start(fsync=False) if "postgresql" in args.stores.split(",") else None
    try:
        results = [await run_store(args, name, work, server) for name in args.stores.split(",")]
    finally:
        if server:
            server.stop()
    for r in results:
        report(args, r)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--stores", default="sqlite,postgresql")
    p.add_argument("--retain-days", type=int, default=7, help="[events] retain_days")
    p.add_argument("--archive-every", type=int, default=30,
                   help="run the daemon's archiver every N-th day (the other days delete the same events in bulk)")
    p.add_argument("--keep", type=Path, help="work in this folder and leave it (default: a temporary one)")
    a = p.parse_args()
    if a.keep:
        a.keep.mkdir(parents=True, exist_ok=True)
        asyncio.run(main(a, a.keep.resolve()))
    else:
        with tempfile.TemporaryDirectory(prefix="lts-disk-") as tmp:
            asyncio.run(main(a, Path(tmp)))
