"""The embedded store: SQLite through aiosqlite, WAL, synchronous=FULL."""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from lts_server.store import (
    AuthorizationRecord,
    Holder,
    SchemaTooNew,
    Seat,
    StoreError,
    StoreFull,
    StoreUnavailable,
    Unstorable,
    WriteBatch,
    sql,
)
from lts_server.store.sql_alerts import AlertOperations
from lts_server.store.sql_trust import TrustOperations
from lts_server.usagechain import Head

T = TypeVar("T")
MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# A value SQLite (or the sqlite3 module binding it) cannot take: text that is not Unicode (a lone
# surrogate), an integer beyond 64 bits, a string or blob over SQLite's size limit.
UNSTORABLE = (UnicodeEncodeError, OverflowError, sqlite3.DataError)


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) for every numbered migration shipped with the package."""
    folder = resources.files("lts_server.store") / "migrations"
    found = []
    for entry in folder.iterdir():
        m = MIGRATION_NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    if [v for v, _, _ in found] != list(range(1, len(found) + 1)):
        raise RuntimeError("migration files must be numbered 0001, 0002, ... without gaps")
    return found


def _translate(e: sqlite3.Error, path: Path) -> StoreError:
    text = str(e)
    if "locked" in text or "busy" in text:
        return StoreUnavailable(f"database {path} is locked by another process: {text}")
    if "full" in text:
        return StoreFull(f"database {path}: {text}; free disk space, then retry")
    if "readonly" in text:
        return StoreError(f"database {path} cannot be written ({text}): make the file, its -wal and -shm files "
                          "and its folder writable by the service user")
    return StoreError(f"database {path}: {text}")


class SQLiteStore(sql.Operations, AlertOperations, TrustOperations):
    shared = False  # this process is the only writer

    def __init__(self, path: Path, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        # Device lookups read on a connection (and thread) of their own, so they do not queue behind
        # the commits and their flushes on the writer's; they need committed rows only (devices.py).
        self._reader: aiosqlite.Connection | None = None
        self._failed_pipeline: int | None = None
        # The usage chain this store's batches extend (claim_chain); None: events are written unchained.
        self.chain: Head | None = None
        # Told (events, seconds) after each durable write: the metrics' hook.
        self.on_commit: Callable[[int, float], None] | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable("the database is not open")
        return self._db

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Created for the service user only, whatever the umask; SQLite gives -wal and -shm the same mode.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.fchmod(fd, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as e:
            raise StoreError(f"cannot create {self.path} or its folder: {e.strerror}") from None
        try:
            self._db = await aiosqlite.connect(
                self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None
            )
            await self._db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            async with self._db.execute("PRAGMA journal_mode = WAL") as cur:
                mode = (await cur.fetchone() or ("?",))[0]
            if mode != "wal":
                raise StoreError(f"database {self.path}: cannot switch to WAL mode (got {mode})")
            await self._db.execute("PRAGMA synchronous = FULL")
            await self._db.execute("PRAGMA foreign_keys = ON")
            await self._migrate()
            await self._check_writable()
            self._reader = await aiosqlite.connect(
                self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None
            )
            await self._reader.execute("PRAGMA query_only = ON")
        except sqlite3.Error as e:
            await self.close()
            raise _translate(e, self.path) from None
        except StoreError:
            await self.close()
            raise

    async def _migrate(self) -> None:
        db = self.db
        await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        async with db.execute("SELECT MAX(version) FROM schema_version") as cur:
            current = (await cur.fetchone() or (None,))[0] or 0
        known = migrations()
        if current > len(known):
            raise SchemaTooNew(
                f"database {self.path} has schema version {current}, but this lts-server "
                f"knows versions up to {len(known)}: upgrade lts-server or restore a matching backup"
            )
        for version, _name, script in known[current:]:
            try:
                await db.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\nINSERT INTO schema_version (version) VALUES ({version});\nCOMMIT;"
                )
            except sqlite3.Error:
                if db.in_transaction:
                    await db.rollback()
                raise

    async def _check_writable(self) -> None:
        """Fail at start-up, not at the first handshake, when SQLite opened the file read-only."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            await self.db.execute("DELETE FROM schema_version WHERE 0")
        finally:
            await self.db.execute("ROLLBACK")

    async def schema_version(self) -> int:
        async with self.db.execute("SELECT MAX(version) FROM schema_version") as cur:
            return (await cur.fetchone() or (0,))[0] or 0

    async def close(self, timeout: float | None = None) -> None:
        # Nothing to cut short: a call on the database thread ends within busy_timeout.
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.close()
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def ready(self) -> bool:
        if self._db is None:
            return False
        try:
            return await self.schema_version() == len(migrations())
        except sqlite3.Error:
            return False

    async def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                total += p.stat().st_size
        return total

    def _run(self, proc: sql.Procedure[T]) -> T:
        """Drive a procedure on the database thread, in one transaction."""
        con: sqlite3.Connection = self.db._conn
        con.execute("BEGIN IMMEDIATE")
        try:
            result = drive(con, proc)
        except BaseException:
            con.rollback()
            raise
        con.commit()
        return result

    async def _call(self, proc: sql.Procedure[T], lock: int | None = None,
                    busy: Callable[[], T] | None = None) -> T:
        # One process writes a SQLite database: nothing to take turns with, the lock is not needed.
        try:
            # aiosqlite runs every call on its one thread, in order; _execute
            # runs a whole transaction there instead of one hop per statement.
            return await self.db._execute(self._run, proc)
        except UNSTORABLE as e:
            raise Unstorable(f"database {self.path}: {e}") from None
        except sqlite3.Error as e:
            raise _translate(e, self.path) from None

    async def _read(self, proc: sql.Procedure[T]) -> T:
        if self._reader is None:
            raise StoreUnavailable("the database is not open")
        try:
            return await self._reader._execute(_read_in_thread, self._reader._conn, proc)
        except UNSTORABLE as e:
            raise Unstorable(f"database {self.path}: {e}") from None
        except sqlite3.Error as e:
            raise _translate(e, self.path) from None

    async def device_rows(self, clients: set[str]) -> tuple[list[Seat], list[AuthorizationRecord], dict[str, str]]:
        return await self._read(sql.device_rows(clients))

    async def lapsed_seats(self, now_ms: int, limit: int) -> list[Seat]:
        return await self._read(sql.lapsed_seats(now_ms, limit))

    async def item_seats(self, item_id: str, limit: int, offset: int = 0) -> list[Seat]:
        return await self._read(sql.item_seats(item_id, limit, offset))

    async def item_holders(self, item_id: str, seats: bool, now_ms: int, limit: int, offset: int = 0
                           ) -> tuple[int, list[Holder]]:
        return await self._read(sql.item_holders(item_id, seats, now_ms, limit, offset))

    async def claim_chain(self, name: str, server_uuid: str, now_ms: int) -> Head:
        """Take the usage chain `name` (made when new); this store's batches extend it from now on."""
        self.chain = await super().claim_chain(name, server_uuid, now_ms)
        return self.chain

    async def write(self, batch: WriteBatch, pipeline: int | None = None) -> None:
        """Make the batch durable in one transaction, in one hop to the database thread.

        Writes run in submission order. With a pipeline id, a write submitted
        after a failed write of the same pipeline is refused: the ledger
        decided it on top of changes that never committed.
        """
        if not batch:
            return
        started = time.perf_counter()
        try:
            await self.db._execute(self._write_in_thread, batch, pipeline)
        except sqlite3.Error as e:
            raise _translate(e, self.path) from None
        if self.on_commit is not None:
            self.on_commit(len(batch.events), time.perf_counter() - started)

    def _write_in_thread(self, batch: WriteBatch, pipeline: int | None) -> None:
        if pipeline is not None and pipeline == self._failed_pipeline:
            raise StoreError("not written: an earlier write of the same batch pipeline failed")
        try:
            head = self._run(sql.write_batch(batch, self.chain))
            if head is not None:  # committed: the chain goes on from here
                self.chain = head
        except BaseException as e:
            if pipeline is not None:
                self._failed_pipeline = pipeline
            if isinstance(e, UNSTORABLE):
                raise self._unstorable(batch, e) from None
            raise

    def _unstorable(self, batch: WriteBatch, error: Exception) -> StoreError:
        """The Unstorable that names the job whose rows hold the value SQLite refused: the batch's parts
        written one by one, each in a savepoint, in a transaction rolled back whatever happens."""
        con: sqlite3.Connection = self.db._conn
        con.execute("BEGIN IMMEDIATE")
        try:
            for job, part in batch.parts():
                con.execute("SAVEPOINT part")
                try:
                    drive(con, sql.write_batch(part))
                except UNSTORABLE as e:
                    if job is None:  # in what the jobs share: no one job to blame
                        break
                    return Unstorable(f"database {self.path}: {e}", job)
                except (sqlite3.Error, StoreError):
                    con.execute("ROLLBACK TO part")  # a conflict of this part without its neighbours
                con.execute("RELEASE part")
        finally:
            con.rollback()
        return StoreError(f"database {self.path}: cannot store a value: {error}")


def _read_in_thread(con: sqlite3.Connection, proc: sql.Procedure[T]) -> T:
    """Drive a reading procedure in one read transaction (one snapshot of committed rows)."""
    con.execute("BEGIN")
    try:
        return drive(con, proc)
    finally:
        con.rollback()


def drive(con: sqlite3.Connection, proc: sql.Procedure[T]) -> T:
    """Answer each statement a procedure yields with sqlite3, and return what it returns."""
    answer: Any = None
    try:
        while True:
            statement = proc.send(answer)
            if isinstance(statement, sql.Query):
                answer = con.execute(statement.sql, statement.params).fetchall()
            elif isinstance(statement, sql.Exec):
                answer = con.execute(statement.sql, statement.params).rowcount
            elif isinstance(statement, sql.QueryIn):
                answer = []
                for i in range(0, len(statement.values), sql.IN_CHUNK):
                    chunk = statement.values[i:i + sql.IN_CHUNK]
                    answer += con.execute(f"{statement.sql} IN ({','.join('?' * len(chunk))})",
                                          (*statement.params, *chunk)).fetchall()
            else:
                con.executemany(statement.sql, statement.rows)
                answer = None
    except StopIteration as done:
        return done.value
