"""Millions of seated devices on one node: build time, memory, start-up, handshakes, database space.

    .venv/bin/python bench/devices.py [--devices 10000000] [--stores sqlite,postgresql]
        [--duration 10] [--rounds 3] [--connections 64] [--keep DIR]

For each store: a daemon starts on a fresh state (it migrates and imports two
license files: four per-device items, two handshake codes) and is measured
empty, then stopped; the benchmark then writes N seated devices straight into
the database with bulk SQL, exactly the rows a granted handshake writes (a
seat, an authorization, a `seat.granted` and a `handshake` event, the item's
`seats_used`), and the statistics those grants make (rollup counters per
bucket, each device's all-time marks; the grants lie 35-330 days back, so
their day rows are already pruned as the daemon would have), with
`rollup_state` past them, so the statistics are exact. The
same is built with 10,000 devices. Both daemons then start (spawn to
`/readyz` answering 200 is the start-up time; RSS from /proc after it) and
wrk drives them in alternating rounds through HTTP: new devices, and
refreshes of 5,000 seated devices spread over the state. Last, the space:
per table and index, per seated device, per handshake, and what the event
log grows by per day for 1M devices refreshing hourly.

`--keep DIR` keeps the built states (and the PostgreSQL data folder) in DIR
and reuses them in the next run with the same --devices.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gzip
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import pg  # noqa: E402  (tests/pg.py: a throwaway PostgreSQL server)
from common import NOW, device_item, free_port, license_file, vendor_key, write_config  # noqa: E402

from lts_server.archive import archive_line  # noqa: E402
from lts_server.store import StoredEvent  # noqa: E402
from lts_server.store.sql import EVENT_COLUMNS, stored_event  # noqa: E402

ORG = "216998"
# Two license files of two per-device items each; a code per file (its default code).
LICENSES = {"BDEV1": ["BDEV1-1", "BDEV1-2"], "BDEV2": ["BDEV2-1", "BDEV2-2"]}
ITEMS = [i for items in LICENSES.values() for i in items]
CODE_OF = {i: f"{ORG}-{lic}" for lic, items in LICENSES.items() for i in items}
QUANTITY = 50_000_000
SMALL = 10_000
REFRESHED = 5_000
DAY_MS = 86_400_000
YEAR_MS = 365 * DAY_MS
# Grants spread from 330 to 35 days back: seats still held (yearly period), device marks of their
# 3-minute, 2-hour and daily buckets past the 31 days after which the daemon prunes them.
OLDEST_S = int((NOW - timedelta(days=330)).timestamp())
SPAN_S = int(timedelta(days=295).total_seconds())
FLEET = 1_000_000  # the fleet of the growth estimate: devices refreshing hourly
SIZES = ("3m", "2h", "1d", "1mo")
# The rollups' position past every event: the last in (tx, seq) order (tx is each event's transaction on
# PostgreSQL, 0 on SQLite), as the rollup job leaves it.
ROLLED_UP = ("UPDATE rollup_state SET"
             " last_tx = COALESCE((SELECT MAX(tx) FROM events), 0),"
             " last_seq = COALESCE((SELECT MAX(seq) FROM events WHERE tx = (SELECT MAX(tx) FROM events)), 0)"
             " WHERE id = 1")
WIDTH_MS = {"3m": 180_000, "2h": 7_200_000, "1d": DAY_MS}


def uuid_sql(i: str, dialect: str) -> str:
    """Device i's client UUID (36 characters, as a real one), in SQL."""
    if dialect == "sqlite":
        return f"printf('%08x-0000-4000-8000-%012x', {i}, {i})"
    return f"lpad(to_hex({i}), 8, '0') || '-0000-4000-8000-' || lpad(to_hex({i}::bigint), 12, '0')"


def client_uuid(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i:012x}"


def granted_s(i: int, n: int) -> int:
    return OLDEST_S + i * SPAN_S // n


@dataclass
class State:
    """One built state: a daemon's folder and its database."""

    name: str
    folder: Path
    devices: int
    url: str | None = None  # PostgreSQL
    # Seats held when the measured daemon starts: the built devices, plus those earlier runs on a
    # --keep state added through HTTP.
    seated: int = 0
    build_seconds: float = 0.0
    empty_rss: int = 0
    empty_ready: float = 0.0
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    ready_seconds: float = 0.0
    rss: int = 0
    rss_after: int = 0
    rounds: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    @property
    def sqlite(self) -> Path:
        return self.folder / "state" / "lts-server.sqlite3"


# -- the daemon ---------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """VmRSS of pid and its descendants (a supervisor's workers)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return total


def start(state: State, pub: Path) -> None:
    """Spawn the daemon and wait for /readyz: the start-up time."""
    state.port = free_port()
    cfg = write_config(state.folder, pub, state.port, url=state.url)
    started = time.perf_counter()
    state.proc = subprocess.Popen([sys.executable, "-m", "lts_server", "--config", str(cfg)],
                                  stdout=subprocess.DEVNULL, stderr=(state.folder / "daemon.log").open("ab"))
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        if state.proc.poll() is not None:
            raise SystemExit(f"{state.name}: daemon exited with {state.proc.returncode}; see {state.folder}/daemon.log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{state.port}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            time.sleep(0.02)
    state.ready_seconds = time.perf_counter() - started
    time.sleep(2)  # let start-up's garbage settle before reading RSS
    state.rss = rss_bytes(state.proc.pid)


def stop(state: State) -> None:
    if state.proc and state.proc.poll() is None:
        state.proc.send_signal(signal.SIGTERM)
        state.proc.wait(120)
    state.proc = None


def handshake(port: int, code: str, client: str) -> int:
    body = json.dumps({"handshakeCode": code, "clientUuid": client, "product": "barcode-reader",
                       "deploymentType": "browser"}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/handshake", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


# -- building the state -----------------------------------------------------------------------------------


def bulk_sqlite(path: Path, n: int) -> None:
    """N granted devices in one transaction: the rows the ledger writes for each, and their rollups."""
    con = sqlite3.connect(path, isolation_level=None)
    # Only while building: no journal, no flushes, a large cache. The daemon sets its own at start.
    con.execute("PRAGMA journal_mode = OFF")
    con.execute("PRAGMA synchronous = OFF")
    con.execute("PRAGMA cache_size = -1000000")
    con.execute("PRAGMA temp_store = MEMORY")
    base = con.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
    items = " ".join(f"WHEN {k} THEN '{item}'" for k, item in enumerate(ITEMS))
    codes = " ".join(f"WHEN {k} THEN '{CODE_OF[item]}'" for k, item in enumerate(ITEMS))
    # Device i: item i % 4, granted at g (seconds), seat and authorization until g + 365 days.
    devices = (f"WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < {n - 1}),"
               f" d AS (SELECT i, {uuid_sql('i', 'sqlite')} AS client, CASE i % 4 {items} END AS item,"
               f" CASE i % 4 {codes} END AS code, ({OLDEST_S} + i * {SPAN_S} / {n}) AS g FROM s)")
    con.execute("BEGIN")
    con.execute(f"{devices} INSERT INTO seats (item_id, client_uuid, granted_ms, refreshed_ms, expires_ms)"
                f" SELECT item, client, g * 1000, g * 1000, g * 1000 + {YEAR_MS} FROM d")
    con.execute(f"{devices} INSERT INTO authorizations (code, client_uuid, item_id, instances, granted_ms,"
                f" expires_ms) SELECT code, client, item, 1, g * 1000, g * 1000 + {YEAR_MS} FROM d")
    # The two events of a grant, in the ledger's order: seat.granted, then handshake.
    con.execute(
        f"{devices} INSERT INTO events (seq, at_ms, type, code, item_id, client_uuid, product, deployment_type,"
        " result, detail, units, instances)"
        f" SELECT {base} + 2 * i + 1, g * 1000, 'seat.granted', code, item, client, NULL, NULL, NULL,"
        " '{\"expiresAt\":\"' || strftime('%Y-%m-%dT%H:%M:%S', g + 31536000, 'unixepoch') || '+00:00\"}', NULL, NULL"
        " FROM d UNION ALL"
        f" SELECT {base} + 2 * i + 2, g * 1000, 'handshake', code, item, client, 'barcode-reader', 'browser',"
        " 0, NULL, NULL, NULL FROM d ORDER BY 1")
    con.execute("UPDATE items SET seats_used = (SELECT COUNT(*) FROM seats WHERE seats.item_id = items.item_id)")
    rollups_sql(con.execute, base, "sqlite", n)
    con.execute(ROLLED_UP)
    con.execute("COMMIT")
    con.execute("PRAGMA journal_mode = WAL")
    con.close()


def rollups_sql(execute: Any, base: int, dialect: str, n: int) -> None:
    """The rollups of the bulk grants, as the rollup job folds them (core/usage.py fold): counters per code
    and item and bucket; each device's all-time marks (rollup_clients; its day rows are older than the 31
    days the daemon keeps them, and its months than the three it remembers)."""
    grants = f"FROM events WHERE seq > {base} AND type = 'handshake'"
    month = ("CAST(strftime('%s', at_ms / 1000, 'unixepoch', 'start of month') AS INTEGER) * 1000"
             if dialect == "sqlite" else
             "(extract(epoch FROM date_trunc('month', to_timestamp(at_ms / 1000) AT TIME ZONE 'UTC')))::bigint * 1000")
    for scope, column in (("code", "code"), ("item", "item_id")):
        for size in SIZES:
            bucket = month if size == "1mo" else f"at_ms - at_ms % {WIDTH_MS[size]}"
            execute(f"INSERT INTO rollups (scope, key, size, bucket_ms, granted, refused, units, devices, instances)"
                    f" SELECT '{scope}', {column}, '{size}', {bucket}, COUNT(*), 0, 0, COUNT(*), 0 {grants}"
                    f" GROUP BY {column}, {bucket}")
        execute(f"INSERT INTO rollups (scope, key, size, bucket_ms, granted, refused, units, devices, instances)"
                f" SELECT '{scope}', {column}, 'all', 0, COUNT(*), 0, 0, COUNT(*), 0 {grants} GROUP BY {column}")
    # Codes and items by number; device i (item i % 4 and its code) is number i + 1, its marks those two
    # numbers with no recent month (core/marks.py).
    codes = sorted(set(CODE_OF.values()))
    kid = {("code", c): k + 1 for k, c in enumerate(codes)} | {("item", i): len(codes) + k + 1
                                                                 for k, i in enumerate(ITEMS)}
    execute("INSERT INTO rollup_keys (id, scope, key) VALUES "
            + ", ".join(f"({v}, '{scope}', '{key}')" for (scope, key), v in kid.items()))
    blob = {k: bytes([kid[("code", CODE_OF[i])], 0, kid[("item", i)], 0]).hex() for k, i in enumerate(ITEMS)}
    literal = (lambda h: f"X'{h}'") if dialect == "sqlite" else (lambda h: f"decode('{h}', 'hex')")
    marks = " ".join(f"WHEN {k} THEN {literal(h)}" for k, h in blob.items())
    execute(f"INSERT INTO rollup_clients (client_uuid, id, marks) SELECT client_uuid, (seq - {base}) / 2,"
            f" CASE ((seq - {base}) / 2 - 1) % 4 {marks} END {grants} ORDER BY client_uuid")
    execute(f"UPDATE rollup_state SET next_client = {n + 1} WHERE id = 1")


async def bulk_postgres(url: str, n: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        base = await conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM events")
        items = "ARRAY[" + ",".join(f"'{i}'" for i in ITEMS) + "]"
        codes = "ARRAY[" + ",".join(f"'{CODE_OF[i]}'" for i in ITEMS) + "]"
        devices = (f"WITH d AS (SELECT i, {uuid_sql('i', 'postgresql')} AS client, ({items})[i % 4 + 1] AS item,"
                   f" ({codes})[i % 4 + 1] AS code, ({OLDEST_S}::bigint + i::bigint * {SPAN_S} / {n}) AS g"
                   f" FROM generate_series(0, {n - 1}) AS i)")
        async with conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = off")
            await conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
            await conn.execute("SET LOCAL work_mem = '256MB'")
            await conn.execute(f"{devices} INSERT INTO seats (item_id, client_uuid, granted_ms, refreshed_ms,"
                               f" expires_ms) SELECT item, client, g * 1000, g * 1000, g * 1000 + {YEAR_MS} FROM d")
            await conn.execute(f"{devices} INSERT INTO authorizations (code, client_uuid, item_id, instances,"
                               f" granted_ms, expires_ms) SELECT code, client, item, 1, g * 1000,"
                               f" g * 1000 + {YEAR_MS} FROM d")
            expiry = ("to_char(to_timestamp(g + 31536000) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS')"
                      " || '+00:00'")
            await conn.execute(
                f"{devices} INSERT INTO events (seq, at_ms, type, code, item_id, client_uuid, product,"
                " deployment_type, result, detail, units, instances)"
                f" SELECT {base} + 2 * i + 1, g * 1000, 'seat.granted', code, item, client, NULL::text, NULL::text,"
                f" NULL::int, '{{\"expiresAt\":\"' || {expiry} || '\"}}', NULL::bigint, NULL::int FROM d UNION ALL"
                f" SELECT {base} + 2 * i + 2, g * 1000, 'handshake', code, item, client, 'barcode-reader',"
                " 'browser', 0, NULL, NULL, NULL FROM d ORDER BY 1")
            await conn.execute("UPDATE items SET seats_used = (SELECT COUNT(*) FROM seats"
                               " WHERE seats.item_id = items.item_id)")
            statements: list[str] = []
            rollups_sql(statements.append, base, "postgresql", n)
            for statement in statements:
                await conn.execute(statement)
            await conn.execute(ROLLED_UP)
            await conn.execute("SELECT setval(pg_get_serial_sequence('events', 'seq'), (SELECT MAX(seq) FROM events))")
        # As autovacuum would leave a table after a bulk load: visibility map set, planner statistics.
        await conn.execute("VACUUM (ANALYZE)")
    finally:
        await conn.close()


async def build(state: State, pub: Path, lics: dict[str, bytes]) -> None:
    """Fresh state: the daemon migrates and imports, measured empty, stopped; then the bulk rows."""
    shutil.rmtree(state.folder, ignore_errors=True)
    state.folder.mkdir(parents=True, exist_ok=True)
    (state.folder / "import").mkdir(exist_ok=True)
    for name, data in lics.items():
        (state.folder / "import" / f"{name}.lic").write_bytes(data)
    start(state, pub)
    for item in ITEMS:  # the import is done when the codes answer
        wait_granting(state, CODE_OF[item])
    state.empty_ready, state.empty_rss = state.ready_seconds, state.rss
    stop(state)
    await reset_probe(state)
    started = time.perf_counter()
    if state.url:
        await bulk_postgres(state.url, state.devices)
    else:
        bulk_sqlite(state.sqlite, state.devices)
    state.build_seconds = time.perf_counter() - started


def wait_granting(state: State, code: str) -> None:
    deadline = time.monotonic() + 60
    while handshake(state.port, code, "probe-device") != 200:
        if time.monotonic() > deadline:
            raise SystemExit(f"{state.name}: code {code} does not grant")
        time.sleep(0.1)


async def reset_probe(state: State) -> None:
    """Undo the probe device's grants (the state holds exactly the bulk devices): its seats, authorizations,
    events and rollups, as if it never came (the daemon is stopped)."""
    statements = [
        "DELETE FROM seats WHERE client_uuid = 'probe-device'",
        "DELETE FROM authorizations WHERE client_uuid = 'probe-device'",
        "DELETE FROM rollup_days",
        "DELETE FROM rollup_clients",
        "DELETE FROM rollup_keys",
        "DELETE FROM rollups",
        "UPDATE rollup_state SET next_client = 1",
        "UPDATE items SET seats_used = 0",
        "DELETE FROM events WHERE client_uuid = 'probe-device'",
        ROLLED_UP,
    ]
    await run_sql(state, statements)


async def run_sql(state: State, statements: list[str]) -> list[list[tuple[Any, ...]]]:
    out: list[list[tuple[Any, ...]]] = []
    if state.url:
        conn = await asyncpg.connect(state.url)
        try:
            for s in statements:
                out.append([tuple(r) for r in await conn.fetch(s)])
        finally:
            await conn.close()
        return out
    con = sqlite3.connect(state.sqlite, isolation_level=None)
    try:
        for s in statements:
            out.append(con.execute(s).fetchall())
    finally:
        con.close()
    return out


# -- handshakes through HTTP -----------------------------------------------------------------------


LUA_DONE = """
function done(summary, latency, requests)
  io.write(string.format("LATENCY p50=%.3f p99=%.3f\\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
  io.write(string.format("STATUS non2xx=%d errors=%d\\n", summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def lua_new(code: str) -> str:
    """New devices: every request a client UUID never seen (prefix, time, thread, counter)."""
    return f"""
local counter, tid_, prefix = 0, 0, "0"
local threads = {{}}
function setup(thread) thread:set("tid", #threads); table.insert(threads, thread) end
function init(args) tid_ = tid; prefix = args[1] or "0"; wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json" end
function request()
  counter = counter + 1
  return wrk.format(nil, "/api/v1/handshake", nil, string.format(
    '{{"handshakeCode":"{code}","clientUuid":"new-%s-%d-%d-%d","product":"barcode-reader","deploymentType":"browser"}}',
    prefix, os.time(), tid_, counter))
end
""" + LUA_DONE


def lua_refresh(devices: list[tuple[str, str]]) -> str:
    """Refreshes: round-robin over seated devices spread over the state (each thread from its own offset)."""
    rows = ",\n".join(
        f"'{{\"handshakeCode\":\"{code}\",\"clientUuid\":\"{client}\",\"product\":\"barcode-reader\","
        f"\"deploymentType\":\"browser\"}}'" for code, client in devices)
    return f"""
local bodies = {{
{rows}
}}
local counter, threads = 0, {{}}
function setup(thread) thread:set("tid", #threads); table.insert(threads, thread) end
function init(args) counter = tid * 997; wrk.method = "POST"; wrk.headers["Content-Type"] = "application/json" end
function request()
  counter = counter + 1
  return wrk.format(nil, "/api/v1/handshake", nil, bodies[(counter % #bodies) + 1])
end
""" + LUA_DONE


def lua_cold(n: int, start: int) -> str:
    """Refreshes of seated devices this run has not touched: device (start + k * stride) mod n for the k-th
    request (of either thread: they take alternate k), a stride coprime with n, so no device comes twice
    within n requests. With a bounded device cache, each is a miss."""
    codes = ",".join(f'"{CODE_OF[i]}"' for i in ITEMS)
    stride = next(s for s in range(7_919, n + 7_919) if math.gcd(s, n) == 1)
    return f"""
local codes = {{{codes}}}
local counter, threads = 0, {{}}
function setup(thread) thread:set("tid", #threads); table.insert(threads, thread) end
function init(args) counter = tid; wrk.method = "POST"; wrk.headers["Content-Type"] = "application/json" end
function request()
  local i = ({start} + counter * {stride}) % {n}
  counter = counter + 2
  return wrk.format(nil, "/api/v1/handshake", nil, string.format(
    '{{"handshakeCode":"%s","clientUuid":"%08x-0000-4000-8000-%012x","product":"barcode-reader","deploymentType":"browser"}}',
    codes[(i % 4) + 1], i, i))
end
""" + LUA_DONE


def refreshed_devices(n: int) -> list[tuple[str, str]]:
    step = max(1, n // REFRESHED)
    return [(CODE_OF[ITEMS[i % 4]], client_uuid(i)) for i in range(0, n, step)][:REFRESHED]


def run_wrk(port: int, script: Path, duration: int, connections: int, prefix: str) -> dict[str, float]:
    out = subprocess.run(["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "--latency",
                          "-s", str(script), f"http://127.0.0.1:{port}", "--", prefix],
                         capture_output=True, text=True, check=True).stdout
    lat = re.search(r"LATENCY p50=([\d.]+) p99=([\d.]+)", out)
    status = re.search(r"STATUS non2xx=(\d+) errors=(\d+)", out)
    assert lat and status, out
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
            "p50": float(lat.group(1)), "p99": float(lat.group(2)),
            "bad": int(status.group(1)) + int(status.group(2))}


# -- the space -----------------------------------------------------------------------------------------


async def space(state: State) -> dict[str, tuple[int, int]]:
    """Bytes and rows per table and index (indexes as 'table.index', rows 0)."""
    if state.url:
        conn = await asyncpg.connect(state.url)
        try:
            await conn.execute("VACUUM (ANALYZE)")
            out = {}
            for name, heap, rows in await conn.fetch(
                    "SELECT c.relname, pg_table_size(c.oid), c.reltuples::bigint FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'"):
                out[name] = (heap, max(0, rows))
            for table, index, size in await conn.fetch(
                    "SELECT t.relname, i.relname, pg_relation_size(i.oid) FROM pg_index x"
                    " JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid"
                    " JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = 'public'"):
                out[f"{table}.{index}"] = (size, 0)
            return out
        finally:
            await conn.close()
    con = sqlite3.connect(state.sqlite)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        owner = {name: table for name, table in con.execute("SELECT name, tbl_name FROM sqlite_master")}
        out = {}
        for name, size in con.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            table = owner.get(name, name)
            key = name if table == name else f"{table}.{name}"
            out[key] = (size, con.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0] if key == name else 0)
        return out
    finally:
        con.close()


def table_totals(sizes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Per table: (bytes with its indexes, rows)."""
    totals: dict[str, tuple[int, int]] = {}
    for key, (size, rows) in sizes.items():
        table = key.split(".")[0]
        b, r = totals.get(table, (0, 0))
        totals[table] = (b + size, r + rows)
    return totals


async def archive_bytes_per_event(state: State, sample: int = 100_000) -> float:
    """Bytes per event in a gzip'd NDJSON archive (lts_server/archive.py's format), over the newest events of
    the log; their client UUIDs replaced by random ones, as real devices have (the built ones compress
    too well)."""
    rows = (await run_sql(state, [f"SELECT {EVENT_COLUMNS} FROM events ORDER BY seq DESC LIMIT {sample}"]))[0]
    randomized: dict[str, str] = {}
    events: list[StoredEvent] = []
    for r in reversed(rows):
        e = stored_event(tuple(r))
        if e.event.client_uuid:
            client = randomized.setdefault(e.event.client_uuid, str(uuid.uuid4()))
            e = StoredEvent(e.seq, dataclasses.replace(e.event, client_uuid=client))
        events.append(e)
    data = gzip.compress("".join(archive_line(e) for e in events).encode(), compresslevel=6)
    return len(data) / max(1, len(events))


# -- the run ----------------------------------------------------------------------------------------


def mb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e10 else f"{n / 1e6:,.1f} MB"


async def bench(args: argparse.Namespace, work: Path) -> None:
    key, pub = vendor_key(work / "vendor") if not (work / "vendor" / "vendor.pub").exists() else (None, None)
    lics_path = work / "licenses.json"
    if key is not None:
        lics = {lic: license_file(key, lic, [device_item(i, QUANTITY) for i in items], org=ORG).decode()
                for lic, items in LICENSES.items()}
        lics_path.write_text(json.dumps(lics))
    pub = work / "vendor" / "vendor.pub"
    lics_bytes = {k: v.encode() for k, v in json.loads(lics_path.read_text()).items()}
    server = None
    stores = args.stores.split(",")
    try:
        if "postgresql" in stores:
            server = pg_server(work / "pg")
        for store in stores:
            await bench_store(args, work, store, server, pub, lics_bytes)
    finally:
        if server:
            server.halt()
            if not args.keep:
                server.stop()


def pg_server(folder: Path) -> pg.PgServer:
    """The benchmark's PostgreSQL (fsync on, as durable as SQLite's FULL), kept in `folder` for --keep."""
    if (folder / "data").exists():
        server = pg.PgServer(folder, free_port(), pg._bin(), fsync=True)
        server.launch()
        return server
    made = pg.start(fsync=True)
    made.halt()
    shutil.rmtree(folder, ignore_errors=True)
    shutil.move(str(made.folder), folder)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    server = pg.PgServer(folder, free_port(), made.bin, fsync=True)
    server.launch()
    return server


async def database_url(server: pg.PgServer, name: str) -> tuple[str, bool]:
    """The URL of database `name`, and whether it already existed."""
    conn = await asyncpg.connect(server.url())
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server.url(name), bool(exists)


async def bench_store(args: argparse.Namespace, work: Path, store: str, server: pg.PgServer | None, pub: Path,
                      lics: dict[str, bytes]) -> None:
    states = []
    for n in (args.devices, SMALL):
        state = State(f"{store} {n:,}", work / f"{store}-{n}", n)
        built = (state.folder / "built").exists()
        if store == "postgresql":
            assert server is not None
            state.url, existed = await database_url(server, f"devices_{n}")
            built = built and existed
            if not built and existed:
                conn = await asyncpg.connect(server.url())
                await conn.execute(f'DROP DATABASE "devices_{n}"')
                await conn.execute(f'CREATE DATABASE "devices_{n}"')
                await conn.close()
        if built:
            saved = json.loads((state.folder / "built").read_text())
            state.build_seconds, state.empty_rss, state.empty_ready = saved["seconds"], saved["rss"], saved["ready"]
        else:
            await build(state, pub, lics)
            if args.keep:
                (state.folder / "built").write_text(json.dumps({"seconds": state.build_seconds,
                                                                 "rss": state.empty_rss, "ready": state.empty_ready}))
        state.seated = (await run_sql(state, ["SELECT COUNT(*) FROM seats"]))[0][0][0]
        states.append(state)
    big, small = states
    print(f"\n== {store}: {big.devices:,} seated devices (and {small.devices:,} for comparison) ==", flush=True)
    print(f"build (bulk SQL, daemon stopped): {big.build_seconds:.1f} s for {big.devices:,} devices"
          f" ({big.devices / big.build_seconds:,.0f} devices/s); {small.build_seconds:.1f} s for {small.devices:,}",
          flush=True)
    before = {s.name: await space(s) for s in states}
    handshakes_before = {s.name: (await run_sql(s, ["SELECT COUNT(*) FROM events WHERE type = 'handshake'"]))[0][0][0]
                         for s in states}
    try:
        for s in states:
            start(s, pub)
        empty = big.empty_rss
        print(f"empty daemon (licenses imported, no seats): RSS {mb(empty)}, ready in {big.empty_ready:.2f} s")
        for s in states:
            per = (s.rss - empty) / s.seated
            print(f"{s.name:>22} seats ({s.seated:,} held): ready in {s.ready_seconds:6.2f} s, RSS {mb(s.rss)},"
                  f" {per:,.0f} bytes per seated device above empty", flush=True)
        scripts = {"new": work / "new.lua", "refresh": work / "refresh.lua"}
        scripts["new"].write_text(lua_new(CODE_OF[ITEMS[0]]))
        for s in states:
            (work / f"refresh-{s.devices}.lua").write_text(lua_refresh(refreshed_devices(s.devices)))
        for r in range(args.rounds):
            for kind in ("new", "refresh"):
                for s in states:
                    script = scripts["new"] if kind == "new" else work / f"refresh-{s.devices}.lua"
                    result = run_wrk(s.port, script, args.duration, args.connections, f"{r}{s.devices}")
                    s.rounds.setdefault(kind, []).append(result)
            # The big state only: the small one has too few devices to go a round without repeats.
            cold = work / f"cold-{r}.lua"
            cold.write_text(lua_cold(big.devices, r * big.devices // max(1, args.rounds)))
            big.rounds.setdefault("cold", []).append(run_wrk(big.port, cold, args.duration, args.connections, "c"))
        for s in states:
            s.rss_after = rss_bytes(s.proc.pid) if s.proc else 0
    finally:
        for s in states:
            stop(s)
    print(f"handshakes through HTTP: wrk -c{args.connections} -d{args.duration}s, {args.rounds} alternating rounds,"
          " medians; refreshes cycle over 5,000 seated devices spread over the state")
    print(f"  {'workload':8} {'state':>22} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    med: dict[tuple[str, str], dict[str, float]] = {}
    for kind in ("new", "refresh"):
        for s in states:
            runs = s.rounds[kind]
            m = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99")}
            med[(kind, s.name)] = m
            print(f"  {kind:8} {s.name:>22} {m['rps']:8.0f} {m['p50']:8.2f} {m['p99']:8.2f}"
                  f" {sum(int(r['bad']) for r in runs):8d}")
        b, sm = med[(kind, big.name)], med[(kind, small.name)]
        print(f"  {kind:8} {'ratio big/small':>22} {b['rps'] / sm['rps']:8.2f} {b['p50'] / sm['p50']:8.2f}"
              f" {b['p99'] / sm['p99']:8.2f}")
    runs = big.rounds["cold"]
    m = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99")}
    print(f"  {'cold':8} {big.name:>22} {m['rps']:8.0f} {m['p50']:8.2f} {m['p99']:8.2f}"
          f" {sum(int(r['bad']) for r in runs):8d}   (refreshes of devices not touched before in this run:"
          " each a miss for a bounded device cache)")
    for s in states:
        print(f"  RSS after the rounds, {s.name}: {mb(s.rss_after)}")
    await report_space(big, before[big.name], handshakes_before[big.name])
    if args.archive:
        await measure_archive(big)
        (big.folder / "built").unlink(missing_ok=True)  # no longer the state it was


async def report_space(state: State, before: dict[str, tuple[int, int]], handshakes_before: int) -> None:
    after = await space(state)
    handshakes = (await run_sql(state, ["SELECT COUNT(*) FROM events WHERE type = 'handshake'"]))[0][0][0]
    total_before = sum(b for b, _ in before.values())
    total_after = sum(b for b, _ in after.values())
    n = state.seated
    print(f"database space with {n:,} seated devices (before the HTTP rounds): {mb(total_before)},"
          f" {total_before / n:,.0f} bytes per seated device")
    print(f"  {'table or index':42} {'bytes':>15} {'rows':>12} {'bytes/row':>10} {'per device':>11}")
    for key in sorted(before, key=lambda k: -before[k][0]):
        size, rows = before[key]
        if size < 100_000:
            continue
        per_row = f"{size / rows:10.1f}" if rows else " " * 10
        print(f"  {key:42} {size:15,} {rows:12,} {per_row} {size / n:11.1f}")
    grown = total_after - total_before
    made = handshakes - handshakes_before
    print(f"after the HTTP rounds: {mb(total_after)}; {made:,} handshakes added {mb(grown)}:"
          f" {grown / max(1, made):,.0f} bytes per handshake (new devices and refreshes, indexes included)")
    totals = table_totals(before)
    ev_bytes, ev_rows = totals["events"]
    per_event = ev_bytes / ev_rows
    clients_bytes, _ = totals["rollup_clients"]
    gz = await archive_bytes_per_event(state)
    # A refresh writes two events (seat.refreshed, handshake).
    events_day = FLEET * 24 * 2
    print(f"event log: {per_event:.0f} bytes per event in the database (table and indexes),"
          f" {gz:.0f} bytes per event in a gzip'd NDJSON archive")
    print(f"growth per day, {FLEET:,} devices refreshing hourly ({FLEET * 24:,} handshakes, {events_day:,} events):")
    print(f"  event log {mb(events_day * per_event)}/day in the database"
          f" ({mb(events_day * per_event * 365)} a year kept forever);"
          f" with [events] retain_days = 30 it stays at {mb(events_day * per_event * 30)}"
          f" and the archive files grow {mb(events_day * gz)}/day")
    print(f"  rollup device marks: {clients_bytes / n:.0f} bytes a device for good (rollup_clients), and a day row"
          " per device active that day, kept 31 days (rollup_days: see bench/disk.py)")


async def measure_archive(state: State) -> None:
    """Archive the bulk events older than 100 days (about 8/11 of them) with the daemon's own archiver, as
    `[events] retain_days = 100` would: how fast, and what the files take. Changes the state: last step."""
    from lts_server.archive import Archiver
    from lts_server.core.times import utcnow
    from lts_server.store.postgres import PostgresStore
    from lts_server.store.sqlite import SQLiteStore

    store = PostgresStore(state.url) if state.url else SQLiteStore(state.sqlite)
    await store.open()
    try:
        now = utcnow()
        started = time.perf_counter()
        report = await Archiver(store, state.folder / "archive").run(now - timedelta(days=100), now)
        seconds = time.perf_counter() - started
    finally:
        await store.close()
    size = sum(r.bytes for r in report.files)
    print(f"archive ([events] retain_days = 100, the daemon's archiver): {report.events:,} events in"
          f" {seconds:.1f} s ({report.events / seconds:,.0f} events/s, reading, compressing, fsync, deleting in"
          f" transactions of 5,000), {len(report.files)} files, {size / max(1, report.events):.1f} bytes per event"
          " (the built client UUIDs compress better than random ones: see the estimate above)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=10_000_000)
    p.add_argument("--stores", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--keep", type=Path, help="keep (and reuse) the built states in this folder")
    p.add_argument("--archive", action="store_true",
                   help="last, archive the big state's events older than 100 days and time it (changes the state)")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        asyncio.run(bench(args, args.keep.resolve()))
    else:
        with tempfile.TemporaryDirectory(prefix="lts-devices-") as tmp:
            asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
