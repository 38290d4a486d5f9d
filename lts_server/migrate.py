"""`lts-server migrate --to postgresql://...`: move a SQLite deployment into an empty PostgreSQL database.

Everything moves in one PostgreSQL transaction: licenses, items with their
counters, codes, seats, authorizations, usage reports, the event log (with
its sequence numbers), the rollups, imports, the admin account, and the
server's identity (UUID, signing key, secret), so license files bound to the
server keep importing and devices keep verifying. A database that already
holds data is refused; nothing is written to it then.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys

import asyncpg

from lts_server import identity
from lts_server.config import Config, url_problem
from lts_server.store import StoreError
from lts_server.store.postgres import PostgresStore
from lts_server.store.sqlite import SQLiteStore

# Parents before children (foreign keys); the rest in name order.
FIRST = ("licenses", "items", "handshake_codes")
# Written by the migrations themselves or by this command, not copied.
SKIP = {"schema_version", "rollup_state", "cluster_identity"}
PAGE = 50_000


class MigrateError(Exception):
    pass


async def migrate(cfg: Config, url: str) -> dict[str, int]:
    """Copy the configured SQLite database into the PostgreSQL database at url; returns rows per table."""
    if not cfg.database_path.exists():
        raise MigrateError(f"no SQLite database at {cfg.database_path}: nothing to migrate")
    source = SQLiteStore(cfg.database_path, cfg.storage.busy_timeout_ms)
    await source.open()  # brings the SQLite schema to this version first
    await source.close()
    target = PostgresStore(url, cfg.storage.connect_seconds)
    await target.open()
    await target.close()
    ident = identity.load_or_create(cfg.state_dir)
    con = sqlite3.connect(f"file:{cfg.database_path}?mode=ro", uri=True)
    conn = await asyncpg.connect(url)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        tables = [t for t in FIRST if t in tables] + sorted(t for t in tables if t not in FIRST and t not in SKIP)
        async with conn.transaction():
            for table in [*tables, "cluster_identity"]:
                if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                    raise MigrateError(f"{target.where} is not empty (table {table} holds rows): "
                                       "migrate only into a new, empty database")
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
    finally:
        con.close()
        await conn.close()
    return counts


async def _copy(con: sqlite3.Connection, conn: asyncpg.Connection, table: str) -> int:
    columns = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
    cursor = con.execute(f"SELECT {', '.join(columns)} FROM {table}")
    total = 0
    while rows := cursor.fetchmany(PAGE):
        await conn.copy_records_to_table(table, records=rows, columns=columns)
        total += len(rows)
    return total


def main(cfg: Config, url: str | None) -> int:
    if not url:
        print("lts-server migrate: --to postgresql://user@host:port/dbname is required", file=sys.stderr)
        return 2
    problem = url_problem(url)
    if problem:
        print(f"lts-server migrate: --to: {problem}", file=sys.stderr)
        return 2
    try:
        counts = asyncio.run(migrate(cfg, url))
    except (MigrateError, StoreError, OSError, asyncpg.PostgresError) as e:
        print(f"lts-server migrate: {e}", file=sys.stderr)
        return 1
    width = max(len(t) for t in counts)
    print(f"migrated {cfg.database_path} into {PostgresStore(url).where}:")
    for table, n in counts.items():
        print(f"  {table:{width}} {n:>10,}")
    print("  identity (server UUID, signing key, secret): moved")
    print('next: set [storage] backend = "postgresql" and url in the config, then start lts-server')
    return 0
