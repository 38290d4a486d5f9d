"""`lts-server migrate --to postgresql://...`: move a SQLite deployment into an empty PostgreSQL database.

Everything moves in one PostgreSQL transaction: licenses, items with their
counters, codes, seats, authorizations, usage reports, the event log (with
its sequence numbers), the rollups, imports, the admin account, and the
server's identity (UUID, signing key, secret), so license files bound to the
server keep importing and devices keep verifying. A database that already
holds data is refused (nothing is written to it then), unless --force, which
empties it first in the same transaction.

It copies a consistent snapshot (SQLite's online backup API, into a 0600 file
in the state folder, removed afterwards), and refuses while a daemon runs on
the state folder (statelock.py): what a live daemon wrote after the snapshot
would be lost at the switch. After the copy, and before the commit, the rows
of licenses, seats and events are counted on both sides; a difference rolls
everything back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from lts_server import identity
from lts_server.config import Config, url_problem
from lts_server.store import StoreError
from lts_server.store.postgres import PostgresStore
from lts_server.statelock import StateBusy, StateLock
from lts_server.store.sqlite import SQLiteStore

# Parents before children (foreign keys); the rest in name order.
FIRST = ("licenses", "items", "handshake_codes")
# Written by the migrations themselves or by this command, not copied.
SKIP = {"schema_version", "rollup_state", "cluster_identity"}
PAGE = 50_000
# Counted on both sides after the copy, and printed.
VERIFIED = ("licenses", "seats", "events")


class MigrateError(Exception):
    pass


@dataclass(frozen=True)
class Migrated:
    counts: dict[str, int]  # rows copied per table
    verified: dict[str, int]  # rows of VERIFIED tables, the same in the snapshot and in PostgreSQL
    emptied: bool  # --force emptied a database that held data


def snapshot(database: Path, into: Path) -> None:
    """A consistent copy of a SQLite database (the online backup API), written owner-only."""
    fd = os.open(into, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    os.close(fd)
    source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    target = sqlite3.connect(into)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


async def migrate(cfg: Config, url: str, force: bool = False) -> Migrated:
    """Copy the configured SQLite database into the PostgreSQL database at url."""
    if not cfg.database_path.exists():
        raise MigrateError(f"no SQLite database at {cfg.database_path}: nothing to migrate")
    lock = StateLock(cfg.state_dir)
    try:
        lock.exclusive()
    except StateBusy as e:
        raise MigrateError(str(e)) from None
    copy = cfg.state_dir / "migrate-snapshot.sqlite3"
    try:
        source = SQLiteStore(cfg.database_path, cfg.storage.busy_timeout_ms)
        await source.open()  # brings the SQLite schema to this version first
        await source.close()
        await asyncio.to_thread(snapshot, cfg.database_path, copy)
        target = PostgresStore(url, cfg.storage.connect_seconds)
        await target.open()
        await target.close()
        ident = identity.load_or_create(cfg.state_dir)
        return await _copy_all(copy, url, target.where, ident, force)
    finally:
        with contextlib.suppress(FileNotFoundError):
            copy.unlink()
        lock.release()


async def _copy_all(database: Path, url: str, where: str, ident: identity.Identity, force: bool) -> Migrated:
    con = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    conn = await asyncpg.connect(url)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        tables = [t for t in FIRST if t in tables] + sorted(t for t in tables if t not in FIRST and t not in SKIP)
        emptied = False
        async with conn.transaction():
            for table in [*tables, "cluster_identity"]:
                if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                    if not force:
                        raise MigrateError(f"{where} is not empty (table {table} holds rows): migrate only into a "
                                           "new, empty database, or give --force to replace what it holds")
                    emptied = True
            if emptied:
                await conn.execute(f"TRUNCATE {', '.join([*tables, 'cluster_identity'])}")
            counts: dict[str, int] = {}
            for table in tables:
                counts[table] = await _copy(con, conn, table)
            # How far the rollups are, and where the conversion of an older release's marks stands.
            state = [r[1] for r in con.execute("PRAGMA table_info(rollup_state)") if r[1] != "id"]
            values = con.execute(f"SELECT {', '.join(state)} FROM rollup_state WHERE id = 1").fetchone()
            await conn.execute(f"UPDATE rollup_state SET {', '.join(f'{c} = ${i}' for i, c in enumerate(state, 1))}"
                               " WHERE id = 1", *values)
            await conn.execute("SELECT setval(pg_get_serial_sequence('events', 'seq'),"
                               " GREATEST((SELECT COALESCE(MAX(seq), 0) FROM events), 1))")
            await conn.execute(
                "INSERT INTO cluster_identity (id, server_uuid, signing_key_pem, secret_hex) VALUES (1, $1, $2, $3)",
                ident.server_uuid, identity.to_pem(ident.signing_key).decode(), ident.secret.hex())
            verified: dict[str, int] = {}
            for table in VERIFIED:
                here = con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                there = await conn.fetchval(f"SELECT COUNT(*) FROM {table}")
                if here != there:
                    raise MigrateError(f"verification failed: table {table} has {here:,} rows in the snapshot and "
                                       f"{there:,} in {where}; nothing was committed")
                verified[table] = int(there)
    finally:
        con.close()
        await conn.close()
    return Migrated(counts, verified, emptied)


async def _copy(con: sqlite3.Connection, conn: asyncpg.Connection, table: str) -> int:
    columns = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
    cursor = con.execute(f"SELECT {', '.join(columns)} FROM {table}")
    total = 0
    while rows := cursor.fetchmany(PAGE):
        await conn.copy_records_to_table(table, records=rows, columns=columns)
        total += len(rows)
    return total


def main(cfg: Config, url: str | None, force: bool = False) -> int:
    if not url:
        print("lts-server migrate: --to postgresql://user@host:port/dbname is required", file=sys.stderr)
        return 2
    problem = url_problem(url)
    if problem:
        print(f"lts-server migrate: --to: {problem}", file=sys.stderr)
        return 2
    try:
        done = asyncio.run(migrate(cfg, url, force))
    except (MigrateError, StoreError, OSError, asyncpg.PostgresError) as e:
        print(f"lts-server migrate: {e}", file=sys.stderr)
        return 1
    counts = done.counts
    width = max(len(t) for t in counts)
    where = PostgresStore(url).where
    if done.emptied:
        print(f"--force: emptied {where} first")
    print(f"migrated a snapshot of {cfg.database_path} into {where}:")
    for table, n in counts.items():
        print(f"  {table:{width}} {n:>10,}")
    print("  identity (server UUID, signing key, secret): moved")
    print("verified: " + ", ".join(f"{table} {n:,}" for table, n in done.verified.items())
          + " (the same in SQLite and PostgreSQL)")
    print('next: set [storage] backend = "postgresql" and url in the config, then start lts-server')
    return 0
