"""The multi-node store: PostgreSQL through asyncpg.

Runs the same procedures (store/sql.py) and migrations as SQLite. What is
particular to several nodes sharing one database (docs/design.md, "A
PostgreSQL cluster"):

- No lock every node's commits wait for: nodes commit in parallel and
  PostgreSQL's group commit shares their flushes. What keeps two nodes from
  granting one seat twice is in the rows (conditional updates, unique keys).
- Event numbers therefore commit out of order: readers of the log (the
  change feed, rollups, exports, archives) read it in (tx, seq) order below
  the horizon of transactions in flight (sql.LogOrder), so each sees every
  event once.
- Each process has a node number (cluster_nodes_node) that its writer
  connection stamps on its events (events.node, through the lts.node
  setting), so its change feed (`changes_since`) reads only what the other
  nodes did, and only the columns following needs.
- Migrations run under an advisory lock: nodes starting together on an
  empty database migrate it once.
- A connection that failed because the server went away is terminated, never
  handed back to the pool, and stopping never waits longer than it is given
  (see `_borrow` and `close`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import asyncpg

from lts_server import logs
from lts_server.leases import NodeLeases, Upkeep
from lts_server.store import (
    AuthorizationRecord,
    Change,
    Conflict,
    SchemaTooNew,
    Seat,
    StoreError,
    StoreFull,
    StoreInDoubt,
    StoreUnavailable,
    StoreUnreachable,
    Unstorable,
    WriteBatch,
    pg_batch,
    sql,
)
from lts_server.store.sql_alerts import AlertOperations
from lts_server.store.sql_trust import TrustOperations
from lts_server.usagechain import Head
from lts_server.store.sqlite import migrations

T = TypeVar("T")
# Advisory lock keys (any 64-bit numbers that other applications on the database are unlikely to use).
# None of them is taken by a node's handshake commits.
MIGRATE_LOCK = 0x6C7473_0001
ROLLUP_LOCK = 0x6C7473_0003
ALERT_LOCK = 0x6C7473_0004
IMPORT_LOCK = 0x6C7473_0005
ARCHIVE_LOCK = 0x6C7473_0006
CHAIN_LOCK = 0x6C7473_0007
EXPORT_LOCK = 0x6C7473_0008
ADMIN_LOCK = 0x6C7473_0009
IDENTITY_LOCK = 0x6C7473_000A
CONNECT_PAUSE = 1.5
# No statement waits longer than this for the database: a request fails with 503 instead of hanging.
COMMAND_TIMEOUT = 10.0
# An archive's folded_tx when it has no bound (files written before migration 0011).
NO_BOUND = 2**63 - 1
# Renumbering a restored log rewrites every event once (_renumber_restored): no 10 s limit for that.
RENUMBER_SECONDS = 24 * 3600.0
# How long a stopping node tries to give its leased seats back (else others do, within cluster.lease_ms).
RETIRE_SECONDS = 3.0
# Events with tx below it are final: every transaction older than the oldest one in flight has ended.
HORIZON = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
LOG = sql.LogOrder(horizon=HORIZON, sequential=False)
# Events one read of the change feed returns at most.
FOLLOW_PAGE = 1000
# What following uses of an event (a usage report's id out of its detail): one Change.
FOLLOWED = ("type, item_id, client_uuid,"
            " CASE WHEN type = 'usage.report' THEN detail::json ->> 'reportId' END AS report_id")
# The change feed: the horizon, and the other nodes' final events after a position, with only the columns
# following uses (a usage report's id out of its detail).
FOLLOW = (
    f"SELECT h.x, e.tx, e.seq, e.type, e.item_id, e.client_uuid, e.report_id FROM (SELECT {HORIZON} AS x) h"
    f" LEFT JOIN LATERAL (SELECT tx, seq, {FOLLOWED}"
    " FROM events WHERE (tx, seq) > ($1, $2) AND tx < h.x AND node IS DISTINCT FROM $3"
    " ORDER BY tx, seq LIMIT $4) e ON true"
)
# A device load (DeviceCache) in one round trip and one snapshot: seats, authorizations and the bound
# fingerprint of the clients in $1, as arrays of rows (sql.device_rows reads them in three statements).
DEVICE_ROWS = (
    f"SELECT ARRAY(SELECT ROW({sql.SEAT_COLUMNS}) FROM seats WHERE client_uuid = ANY($1::text[])) AS seats,"
    f" ARRAY(SELECT ROW({sql.AUTHORIZATION_COLUMNS}) FROM authorizations WHERE client_uuid = ANY($1::text[]))"
    " AS auths, ARRAY(SELECT ROW(client_uuid, fingerprint) FROM device_bindings"
    " WHERE client_uuid = ANY($1::text[])) AS bound"
)
# Committed events above the horizon, newest first (Server.catch_up with fresh).
COMMITTED_AFTER = (f"SELECT {FOLLOWED} FROM events WHERE (tx, seq) > ($1, $2) AND node IS DISTINCT FROM $3"
                   " ORDER BY tx DESC, seq DESC LIMIT $4")


def dialect(script: str) -> str:
    """A migration as PostgreSQL takes it: SQLite's rowid key becomes an identity column, BLOB is BYTEA, and
    lines starting with "--pg " (comments to SQLite) are statements."""
    script = re.sub(r"\bseq\s+INTEGER PRIMARY KEY\b", "seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                    script)
    script = re.sub(r"^--pg ", "", script, flags=re.MULTILINE)
    script = re.sub(r"\bBLOB\b", "BYTEA", script)
    return script.replace(") WITHOUT ROWID;", ");")


@lru_cache(maxsize=512)
def numbered(statement: str) -> str:
    """`?` placeholders as PostgreSQL's $1, $2, ... (our SQL has no `?` inside literals)."""
    count = 0

    def number(_: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"${count}"

    return re.sub(r"\?", number, statement)


@lru_cache(maxsize=64)
def unnested(statement: str, columns: tuple[str, ...]) -> str:
    """An INSERT ... VALUES (?, ...) for all its rows at once: VALUES becomes a SELECT from the columns'
    arrays (sql.Many with columns)."""
    values = "VALUES (" + ",".join("?" * len(columns)) + ")"
    assert statement.count(values) == 1, statement
    arrays = ", ".join(f"${n}::{kind}[]" for n, kind in enumerate(columns, 1))
    return statement.replace(values, f"SELECT * FROM unnest({arrays})")


def among(statement: sql.QueryIn) -> str:
    """A QueryIn as one statement: its values are its last parameter, an array."""
    return numbered(f"{statement.sql} IN (SELECT unnest(?::{statement.kind}[]))")


def _rowcount(status: str) -> int:
    """asyncpg's command tag ('UPDATE 1', 'INSERT 0 1', 'DELETE 3') as a row count."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


async def drive(conn: asyncpg.Connection, proc: sql.Procedure[T]) -> T:
    """Answer each statement a procedure yields with asyncpg, and return what it returns."""
    answer: Any = None
    try:
        while True:
            statement = proc.send(answer)
            if isinstance(statement, sql.Query):
                answer = [tuple(r) for r in await conn.fetch(numbered(statement.sql), *statement.params)]
            elif isinstance(statement, sql.Exec):
                answer = _rowcount(await conn.execute(numbered(statement.sql), *statement.params))
            elif isinstance(statement, sql.QueryIn):
                answer = [tuple(r) for r in await conn.fetch(among(statement), *statement.params, statement.values)]
            else:
                if statement.rows and statement.columns:
                    await conn.execute(unnested(statement.sql, statement.columns),
                                       *(list(column) for column in zip(*statement.rows)))
                elif statement.rows:
                    await conn.executemany(numbered(statement.sql), statement.rows)
                answer = None
    except StopIteration as done:
        return done.value


# A value the database cannot store or compare: the server's data exceptions (SQLSTATE class 22: text
# with NUL, a character the database's encoding lacks, a number out of range) and the client's own
# refusal to encode a parameter (asyncpg's InterfaceError-based DataError).
UNSTORABLE = (asyncpg.DataError, asyncpg.exceptions._base.DataError)
# The database server is away (stopped, restarting, unreachable): retry later. InternalClientError is
# asyncpg confused by a connection lost mid-operation ("cannot switch to state 15; another operation
# is in progress"), seen when PostgreSQL is killed under load.
AWAY = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
        asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InternalClientError)
FAILURES = (asyncpg.PostgresError, *AWAY)


def _translate(e: Exception, where: str) -> StoreError:
    if isinstance(e, asyncpg.PostgresError) and e.sqlstate == pg_batch.CONFLICT:
        detail = getattr(e, "detail", None)
        return Conflict(str(e), int(detail) if detail and detail.isdigit() else None)
    if isinstance(e, UNSTORABLE):
        return Unstorable(f"{where}: {e}")
    if isinstance(e, asyncpg.DiskFullError):
        return StoreFull(f"{where}: the database server's disk is full; free space, then retry")
    if isinstance(e, (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError, asyncpg.SerializationError)):
        return StoreUnavailable(f"{where}: {e}")
    if isinstance(e, AWAY):
        return StoreUnreachable(f"{where}: the database server is unreachable: {e}")
    return StoreError(f"{where}: {e}")


@dataclass(frozen=True)
class Changes:
    """What other nodes wrote after a position of the event log."""

    events: list[Change]
    upto: sql.Position  # the feed has been read up to here
    more: bool  # a full page: more may follow at once


class _Loop:
    """An event loop on a thread of its own, for the writer's connection: its round trips do not queue
    behind the HTTP parsing of the caller's loop."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on this loop; the caller's loop awaits it."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A connection given back to the pool keeps its session: no reset query (RESET ALL, UNLISTEN *,
    pg_advisory_unlock_all: a round trip on every release, one per device load). asyncpg still rolls back
    an open transaction first. Nothing leaves session state behind: settings are the connect's, LISTEN has
    a connection of its own (store/pg_queue.py), and `exclusive` ends the session of a lock it cannot
    vouch was released."""


def _change(row: asyncpg.Record) -> Change:
    """A row of FOLLOWED columns."""
    return Change(row["type"], row["item_id"], row["client_uuid"], row["report_id"])


class PostgresStore(sql.Operations, AlertOperations, TrustOperations):
    shared = True  # other nodes may write the same database
    ALERT_LOCK = ALERT_LOCK
    CHAIN_LOCK = CHAIN_LOCK
    ROLLUP_LOCK = ROLLUP_LOCK
    ADMIN_LOCK = ADMIN_LOCK
    LOG = LOG

    def __init__(self, url: str, connect_seconds: float = 15.0, password: str | None = None, lease_ms: int = 5000,
                 lease_seats: int = 64) -> None:
        self.url = url
        # From storage.password_file (a systemd credential): never in the URL, never logged.
        self._password = password
        self.connect_seconds = connect_seconds
        self._pool: asyncpg.Pool | None = None
        # The writer's thread and what lives there (touched only there): its connection, and the lock that
        # keeps its writes in submission order.
        self._thread: _Loop | None = None
        self._writer: asyncpg.Connection | None = None
        self._write_lock: asyncio.Lock | None = None
        # Batches written per path: "one_statement" (pg_batch, plain batches) or "statements" (the others).
        self.batches: collections.Counter[str] = collections.Counter()
        self._failed_pipeline: int | None = None
        # This node's registration and seat leases (cluster.lease_ms, cluster.lease_seats), kept up by a
        # thread of its own once open.
        self.leases = NodeLeases(lease_ms, lease_seats)
        self._upkeep: Upkeep | None = None
        # This node's usage chain (claim_chain), extended by its batches; None: events are written unchained.
        self.chain: Head | None = None
        # Told (events, seconds) after each durable write: the metrics' hook.
        self.on_commit: Callable[[int, float], None] | None = None

    @property
    def node(self) -> int:
        """This process's number in the cluster (cluster_nodes), stamped on the events it writes."""
        return self.leases.node

    @property
    def where(self) -> str:
        """The database, for messages: the URL without its password."""
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1@", self.url)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the database is not open")
        return self._pool

    async def open(self) -> None:
        last: Exception | None = None
        deadline = asyncio.get_running_loop().time() + self.connect_seconds
        attempt = 0
        while True:
            attempt += 1
            try:
                self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4, password=self._password,
                                                       command_timeout=COMMAND_TIMEOUT, reset=_keep_session)
                break
            except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError,
                    asyncpg.InvalidCatalogNameError) as e:
                await self.close()
                raise StoreError(f"database {self.where}: {e}") from None
            except (*AWAY, asyncpg.TooManyConnectionsError) as e:
                last = e
                await self.close()
                if asyncio.get_running_loop().time() + CONNECT_PAUSE > deadline:
                    raise StoreUnavailable(f"database {self.where} is unreachable ({attempt} tries in "
                                           f"{self.connect_seconds:g} s): {last}") from None
                logs.event("store.connect_retry", logs.logging.WARNING, database=self.where, error=str(e),
                           attempt=attempt)
                await asyncio.sleep(CONNECT_PAUSE)
        try:
            await self._migrate()
            async with self._borrow() as conn:
                await self.leases.register(conn)
            self._thread = _Loop(f"lts-writer-{self.node}")
            await self._thread.call(self._start_writer())
            self._upkeep = Upkeep(self.leases, self.connect)
        except (asyncpg.PostgresError, *AWAY) as e:
            await self.close()
            raise _translate(e, f"database {self.where}") from None
        except StoreError:
            await self.close()
            raise

    async def connect(self, writer: bool = False) -> asyncpg.Connection:
        """A connection of its own, outside the pool (the writer's; the seat queue's LISTEN, held for good).
        The writer's stamps this node's number on the events it writes (the events.node default), and is
        named for pg_stat_activity ("lts-server writer 7")."""
        settings = {"lts.node": str(self.node), "application_name": f"lts-server writer {self.node}"} if writer else {}
        return await asyncpg.connect(self.url, command_timeout=COMMAND_TIMEOUT, timeout=COMMAND_TIMEOUT,
                                     password=self._password, server_settings=settings)

    async def _migrate(self) -> None:
        async with self._borrow() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            known = migrations()
            if current > len(known):
                raise SchemaTooNew(
                    f"database {self.where} has schema version {current}, but this lts-server knows versions "
                    f"up to {len(known)}: upgrade lts-server or restore a matching backup")
            for version, _name, script in known[current:]:
                await conn.execute(dialect(script))
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
            # The functions go with the code, not the schema: each node installs the versions it calls.
            await conn.execute(pg_batch.functions_sql())
            await self._renumber_restored(conn)
            encoding = await conn.fetchval("SHOW server_encoding")
        if encoding != "UTF8":  # text outside the encoding fails its request with 400 (store.Unstorable)
            logs.event("store.not_utf8", logs.logging.WARNING, database=self.where, encoding=encoding,
                       hint="create the database with ENCODING 'UTF8': text this encoding lacks cannot be stored")

    async def _renumber_restored(self, conn: asyncpg.Connection) -> None:
        """Move the log's transaction numbers below this server's when they are ahead of them.

        An event's tx, and the positions kept of the log (the rollups', the archives'), are transaction ids
        of the PostgreSQL server that wrote them. A database restored from a dump onto another server (or
        copied there logically) keeps them while the new server hands out its own, perhaps far lower ones:
        readers would wait until the new numbers passed the old and skip what came between. So when any
        stored number is at or past the server's next transaction id, all of them move down by the same
        amount, below zero: their order is kept, and every new transaction comes after them. Run under the
        migration lock, before any node of the database writes."""
        ahead = await conn.fetchval(
            "SELECT GREATEST((SELECT COALESCE(MAX(tx), 0) FROM events), (SELECT last_tx FROM rollup_state),"
            " (SELECT COALESCE(MAX(folded_tx), 0) FROM event_archives WHERE folded_tx < $1))", NO_BOUND)
        next_tx = await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        if ahead < next_tx:
            return
        shift = ahead + 1
        moved = await conn.execute("UPDATE events SET tx = tx - $1", shift, timeout=RENUMBER_SECONDS)
        await conn.execute("UPDATE rollup_state SET last_tx = last_tx - $1", shift)
        await conn.execute("UPDATE event_archives SET folded_tx = folded_tx - $1 WHERE folded_tx < $2", shift,
                           NO_BOUND)
        logs.event("store.log_renumbered", logs.logging.WARNING, database=self.where, events=moved.split()[-1],
                   shift=shift, next_tx=next_tx,
                   why="the event log's transaction numbers were ahead of this PostgreSQL server's (a database "
                       "restored from another server): moved below them, order kept")

    @contextlib.asynccontextmanager
    async def _borrow(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the pool, for the block. One that failed because the server went away (or that
        is closed) is terminated rather than handed back: asyncpg does not always free the pool's slot
        of a connection lost mid-operation (seen when PostgreSQL is killed under load: the slot stays
        taken, the pool shrinks by one, and Pool.close() waits for it for ever)."""
        async with self.pool.acquire(timeout=COMMAND_TIMEOUT) as conn:
            try:
                yield conn
            except BaseException as e:
                with contextlib.suppress(asyncpg.InterfaceError):  # released already: the pool was terminated
                    if (isinstance(e, AWAY) and not isinstance(e, UNSTORABLE)) or conn.is_closed():
                        conn.terminate()
                raise

    async def schema_version(self) -> int:
        async with self._borrow() as conn:
            return await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")

    async def close(self, timeout: float | None = None) -> None:
        """Close the connections, waiting at most `timeout` seconds for those still in use; then they are
        terminated (a statement cut this way was never acknowledged to anyone)."""
        upkeep, self._upkeep = self._upkeep, None
        if upkeep is not None:  # the leased seats back to their items first (else other nodes sweep them)
            await asyncio.to_thread(upkeep.stop, RETIRE_SECONDS if timeout is None else min(timeout, RETIRE_SECONDS))
        thread, self._thread = self._thread, None
        if thread is not None:
            try:
                await thread.call(self._close_writer(timeout))
            finally:
                thread.stop()
        pool, self._pool = self._pool, None
        try:
            async with asyncio.timeout(timeout):
                if pool is not None:
                    await pool.close()
        except (TimeoutError, *FAILURES) as e:
            held = sum(1 for holder in pool._holders if holder._in_use is not None) if pool is not None else 0
            logs.event("store.close_terminated", logs.logging.WARNING, database=self.where,
                       error=str(e) or type(e).__name__, connections_in_use=held)
            if pool is not None:
                pool.terminate()

    # -- on the writer's thread ----------------------------------------------------------------

    async def _start_writer(self) -> None:
        self._write_lock = asyncio.Lock()
        self._writer = await self.connect(writer=True)

    async def _close_writer(self, timeout: float | None) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await writer.close()
        except (TimeoutError, *FAILURES) as e:
            logs.event("store.close_terminated", logs.logging.WARNING, database=self.where,
                       error=str(e) or type(e).__name__, connections_in_use=1)
            writer.terminate()

    async def ready(self) -> bool:
        if self._pool is None:
            return False
        try:
            return await self.schema_version() == len(migrations())
        except FAILURES:
            return False

    async def size_bytes(self) -> int:
        return await self._fetchval("SELECT pg_database_size(current_database())")

    async def _fetchval(self, statement: str, *args: Any) -> Any:
        try:
            async with self._borrow() as conn:
                return await conn.fetchval(statement, *args)
        except FAILURES as e:
            raise _translate(e, f"database {self.where}") from None

    async def _call(self, proc: sql.Procedure[T], lock: int | None = None,
                    busy: Callable[[], T] | None = None) -> T:
        try:
            async with self._borrow() as conn, conn.transaction():
                if lock is not None:
                    if busy is None:
                        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
                    elif not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", lock):
                        proc.close()
                        return busy()
                return await drive(conn, proc)
        except FAILURES as e:
            raise _translate(e, f"database {self.where}") from None

    async def write(self, batch: WriteBatch, pipeline: int | None = None) -> None:
        """One transaction on the writer connection, on the writer's thread, in submission order; see
        SQLiteStore.write."""
        if not batch:
            return
        thread = self._thread
        if thread is None or self._pool is None:
            raise StoreUnavailable("the database is not open")
        started = time.perf_counter()
        await thread.call(self._write_here(batch, pipeline))
        if self.on_commit is not None:
            self.on_commit(len(batch.events), time.perf_counter() - started)

    async def _send(self, writer: asyncpg.Connection, batch: WriteBatch) -> Head | None:
        """The batch, committed: one statement if it is plain (pg_batch), else the general procedure in a
        transaction. Returns the usage chain's head after it."""
        leasing = self.leases.leasing(batch)
        if pg_batch.plain(batch):
            args, moved = pg_batch.arguments(batch, leasing, self.chain)
            try:
                await writer.execute(pg_batch.statement(moved is not None), *args)
                self.batches["one_statement"] += 1
                return moved or self.chain
            except asyncpg.PostgresError as e:
                if e.sqlstate != pg_batch.CHAIN_MOVED:
                    raise
        async with writer.transaction():
            head = await drive(writer, sql.write_batch(batch, self.chain, leasing))
        self.batches["statements"] += 1
        return head

    async def _write_here(self, batch: WriteBatch, pipeline: int | None) -> None:
        assert self._write_lock is not None
        async with self._write_lock:
            if pipeline is not None and pipeline == self._failed_pipeline:
                raise StoreError("not written: an earlier write of the same batch pipeline failed")
            sent = False
            try:
                if self._writer is None or self._writer.is_closed():
                    self._writer = await self.connect(writer=True)  # back after the server went away
                sent = True
                head = await self._send(self._writer, batch)
            except BaseException as e:
                if pipeline is not None:
                    self._failed_pipeline = pipeline
                if isinstance(e, UNSTORABLE) and self._writer is not None and not self._writer.is_closed():
                    raise await self._unstorable(self._writer, batch, e) from None
                if isinstance(e, AWAY) and self._writer is not None:
                    self._writer.terminate()
                    self._writer = None
                if isinstance(e, (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)):
                    # Another node's transaction crossed this one: nothing is wrong with the batch, decide it
                    # again (a Conflict that names no job).
                    raise Conflict(f"database {self.where}: {e}") from None
                if sent and isinstance(e, AWAY) and not isinstance(e, UNSTORABLE):
                    raise StoreInDoubt(f"database {self.where}: the connection was lost during a commit, which "
                                       f"may or may not have happened: {e}") from None
                if isinstance(e, FAILURES):
                    raise _translate(e, f"database {self.where}") from None
                raise
            if head is not None:  # committed: the chain goes on from here
                self.chain = head

    async def _unstorable(self, writer: asyncpg.Connection, batch: WriteBatch, error: Exception) -> StoreError:
        """The Unstorable that names the job whose rows hold the value the database refused: the batch's
        parts written one by one, each in a savepoint, in a transaction rolled back whatever happens."""
        where = f"database {self.where}"
        try:
            transaction = writer.transaction()
            await transaction.start()
            try:
                for job, part in batch.parts():
                    try:
                        async with writer.transaction():
                            await drive(writer, sql.write_batch(part))
                    except UNSTORABLE as e:
                        if job is None:  # in what the jobs share: no one job to blame
                            break
                        return Unstorable(f"{where}: {e}", job)
                    except (asyncpg.PostgresError, StoreError):
                        continue  # a conflict of this part without its neighbours: not what is looked for
            finally:
                await transaction.rollback()
        except FAILURES as e:
            if isinstance(e, AWAY):
                writer.terminate()
                self._writer = None
            return _translate(e, where)
        return StoreError(f"{where}: {error}")

    async def claim_chain(self, name: str, server_uuid: str, now_ms: int) -> Head:
        """Take the usage chain `name` (made when new); this node's batches extend it from now on."""
        self.chain = await super().claim_chain(name, server_uuid, now_ms)
        return self.chain

    async def changes_since(self, after: sql.Position) -> Changes:
        """Events other nodes wrote after position `after`, final ones only (this node's own are skipped)."""
        try:
            async with self._borrow() as conn:
                rows = await conn.fetch(FOLLOW, after[0], after[1], self.node, FOLLOW_PAGE)
        except FAILURES as e:
            raise _translate(e, f"database {self.where}") from None
        found = [r for r in rows if r["seq"] is not None]
        if len(found) == FOLLOW_PAGE:
            return Changes([_change(r) for r in found], (found[-1]["tx"], found[-1]["seq"]), True)
        # Every final event is read: on to the horizon (what commits from now on lies after it).
        upto = max(after, (rows[0]["x"], 0))
        return Changes([_change(r) for r in found], upto, False)

    async def device_rows(self, clients: set[str]) -> tuple[list[Seat], list[AuthorizationRecord], dict[str, str]]:
        """Every seat and authorization of `clients`, and their bound fingerprints: one statement outside a
        transaction (the handshakes of new devices each wait for one)."""
        try:
            async with self._borrow() as conn:
                row = await conn.fetchrow(DEVICE_ROWS, list(clients))
        except FAILURES as e:
            raise _translate(e, f"database {self.where}") from None
        return ([sql.seat_row(r) for r in row["seats"]], [sql.authorization_row(r) for r in row["auths"]],
                dict(tuple(r) for r in row["bound"]))

    async def committed_after(self, position: sql.Position) -> list[Change]:
        """Events other nodes committed after `position` that are not final yet (a transaction older than
        theirs is still in flight): the newest FOLLOW_PAGE of them, oldest first."""
        try:
            async with self._borrow() as conn:
                rows = await conn.fetch(COMMITTED_AFTER, position[0], position[1], self.node, FOLLOW_PAGE)
        except FAILURES as e:
            raise _translate(e, f"database {self.where}") from None
        return [_change(r) for r in reversed(rows)]

    @contextlib.asynccontextmanager
    async def exclusive(self, key: int) -> AsyncIterator[None]:
        """Hold a cluster-wide lock (a session advisory lock) for the block. What the block raises comes out
        as it was: an OSError of the block's own (a file it writes) is not the database going away."""
        raised: BaseException | None = None
        try:
            async with self._borrow() as conn:
                # The lock must not go back to the pool with its connection (_keep_session): if it may still
                # be held (its statement or the unlock failed or was cancelled), the session ends, and the
                # lock with it.
                held = True
                try:
                    await conn.execute("SELECT pg_advisory_lock($1)", key)
                    try:
                        yield
                    except BaseException as e:
                        raised = e
                        raise
                    finally:
                        try:
                            await conn.execute("SELECT pg_advisory_unlock($1)", key)
                        except FAILURES:  # ending the session releases the lock (and, lost, it is gone anyway)
                            conn.terminate()
                        held = False
                except BaseException:
                    if held:  # the lock's statement or the unlock failed or was cancelled
                        conn.terminate()
                    raise
        except FAILURES as e:
            if e is raised:
                raise
            raise _translate(e, f"database {self.where}") from None

    async def log_position(self) -> sql.Position:
        """The position after every final event: following from there reads only what commits later."""
        return await self._call(sql.log_position(LOG))

    async def cluster_identity(self, candidate: sql.IdentityRow) -> sql.IdentityRow:
        """The cluster's identity: the stored one, or `candidate` stored now by the first node to ask."""
        return await self._call(sql.cluster_identity(candidate), lock=IDENTITY_LOCK)
