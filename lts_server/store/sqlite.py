"""The embedded store: SQLite through aiosqlite, WAL, synchronous=FULL."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

from lts_server.core.model import (
    DeploymentType,
    HandshakeCode,
    Item,
    ItemStatus,
    License,
    LicenseType,
    Period,
)
from lts_server.core.times import from_ms, iso, parse_iso, to_ms, utcnow
from lts_server.core.usage import BUCKETS, EventFacts, aggregate, overuse_delta, tolerance
from lts_server.store import (
    AuthorizationRecord,
    Conflict,
    Event,
    EventQuery,
    ImportRecord,
    LicenseRecord,
    RollupResult,
    RollupRow,
    SchemaTooNew,
    Seat,
    Snapshot,
    StoredEvent,
    StoreError,
    StoreFull,
    StoreUnavailable,
    WriteBatch,
)

MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


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


class SQLiteStore:
    def __init__(self, path: Path, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._failed_pipeline: int | None = None

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
        for version, _name, sql in known[current:]:
            try:
                await db.executescript(
                    f"BEGIN IMMEDIATE;\n{sql}\nINSERT INTO schema_version (version) VALUES ({version});\nCOMMIT;"
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

    async def close(self) -> None:
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

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self.db.execute(sql, tuple(params)) as cur:
            return list(await cur.fetchall())

    async def load(self) -> Snapshot:
        try:
            return await self._load()
        except sqlite3.Error as e:
            raise _translate(e, self.path) from None

    async def _load(self) -> Snapshot:
        snap = Snapshot()
        items_by_license: dict[str, list[Item]] = {}
        for row in await self._all(
            "SELECT item_id, license_id, organization_id, product, edition, deployment_type, license_type,"
            " quantity, period, domain, starts_at, expires_at, revoked, seats_used, units_used,"
            " overuse_used, overused FROM items ORDER BY item_id"
        ):
            item = Item(
                item_id=row[0],
                license_id=row[1],
                organization_id=row[2],
                product=row[3],
                edition=row[4],
                deployment_type=DeploymentType(row[5]),
                license_type=LicenseType(row[6]),
                quantity=row[7],
                period=Period(row[8]) if row[8] else None,
                domain=row[9],
                starts_at=parse_iso(row[10]),
                expires_at=parse_iso(row[11]),
            )
            snap.items[item.item_id] = item
            snap.statuses[item.item_id] = ItemStatus(
                revoked=bool(row[12]),
                seats_used=row[13],
                units_used=row[14],
                overuse_used=row[15],
                overused=bool(row[16]),
            )
            items_by_license.setdefault(item.license_id, []).append(item)
        for row in await self._all(
            "SELECT license_id, alias, organization_id, license_text_version, status, revision, server_uuid,"
            " issued_at, key_id, sha256, file_text, first_imported_ms, updated_ms FROM licenses"
        ):
            lic = License(
                license_id=row[0],
                alias=row[1],
                organization_id=row[2],
                license_text_version=row[3],
                status=row[4],
                revision=row[5],
                server_uuid=row[6],
                issued_at=parse_iso(row[7]),
                items=tuple(items_by_license.get(row[0], ())),
            )
            snap.licenses[lic.license_id] = LicenseRecord(
                lic, row[8], row[9], row[10], from_ms(row[11]), from_ms(row[12])
            )
        members: dict[str, list[str]] = {}
        for code_name, item_id in await self._all(
            "SELECT code_name, item_id FROM code_items ORDER BY code_name, position"
        ):
            members.setdefault(code_name, []).append(item_id)
        for row in await self._all(
            "SELECT name, organization_id, is_default, source_license_id, custom_order, domains, app_ids,"
            " process_names, password_hash FROM handshake_codes"
        ):
            snap.codes[row[0]] = HandshakeCode(
                name=row[0],
                organization_id=row[1],
                is_default=bool(row[2]),
                source_license_id=row[3],
                custom_order=bool(row[4]),
                domains=tuple(json.loads(row[5])),
                app_ids=tuple(json.loads(row[6])),
                process_names=tuple(json.loads(row[7])),
                password_hash=row[8],
                items=tuple(members.get(row[0], ())),
            )
        for org, code_name in await self._all("SELECT organization_id, code_name FROM organization_defaults"):
            snap.organization_defaults[org] = code_name
        for row in await self._all(
            "SELECT item_id, client_uuid, granted_ms, refreshed_ms, expires_ms FROM seats"
        ):
            seat = Seat(row[0], row[1], from_ms(row[2]), from_ms(row[3]), from_ms(row[4]))
            snap.seats.setdefault(seat.item_id, {})[seat.client_uuid] = seat
        for row in await self._all(
            "SELECT path, sha256, state, reason, license_id, revision, seen_ms FROM import_files"
        ):
            snap.imports[row[0]] = ImportRecord(
                path=row[0],
                sha256=row[1],
                state=row[2],
                reason=row[3],
                license_id=row[4],
                revision=row[5],
                seen_at=from_ms(row[6]),
            )
        for row in await self._all(
            "SELECT code, client_uuid, item_id, instances, granted_ms, expires_ms FROM authorizations"
        ):
            snap.authorizations[(row[0], row[1])] = AuthorizationRecord(
                row[0], row[1], row[2], row[3], from_ms(row[4]), from_ms(row[5])
            )
        return snap

    async def write(self, batch: WriteBatch, pipeline: int | None = None) -> None:
        """Make the batch durable in one transaction, in one hop to the database thread.

        Writes run in submission order. With a pipeline id, a write submitted
        after a failed write of the same pipeline is refused: the ledger
        decided it on top of changes that never committed.
        """
        if not batch:
            return
        try:
            # aiosqlite runs every call on its one thread, in order; _execute
            # runs a whole transaction there instead of one hop per statement.
            await self.db._execute(self._write_in_thread, batch, pipeline)
        except sqlite3.Error as e:
            raise _translate(e, self.path) from None

    def _write_in_thread(self, batch: WriteBatch, pipeline: int | None) -> None:
        if pipeline is not None and pipeline == self._failed_pipeline:
            raise StoreError("not written: an earlier write of the same batch pipeline failed")
        con: sqlite3.Connection = self.db._conn
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                self._write(con, batch)
            except BaseException:
                con.rollback()
                raise
            con.commit()
        except BaseException:
            if pipeline is not None:
                self._failed_pipeline = pipeline
            raise

    def _write(self, db: sqlite3.Connection, b: WriteBatch) -> None:
        if b.licenses:
            db.executemany(
                "INSERT INTO licenses (license_id, alias, organization_id, license_text_version, status,"
                " revision, server_uuid, issued_at, key_id, sha256, file_text, first_imported_ms, updated_ms)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (license_id) DO UPDATE SET alias = excluded.alias,"
                " organization_id = excluded.organization_id,"
                " license_text_version = excluded.license_text_version, status = excluded.status,"
                " revision = excluded.revision, server_uuid = excluded.server_uuid,"
                " issued_at = excluded.issued_at, key_id = excluded.key_id, sha256 = excluded.sha256,"
                " file_text = excluded.file_text, updated_ms = excluded.updated_ms",
                [
                    (
                        r.license.license_id,
                        r.license.alias,
                        r.license.organization_id,
                        r.license.license_text_version,
                        r.license.status,
                        r.license.revision,
                        r.license.server_uuid,
                        iso(r.license.issued_at),
                        r.key_id,
                        r.sha256,
                        r.file_text,
                        to_ms(r.first_imported_at),
                        to_ms(r.updated_at),
                    )
                    for r in b.licenses
                ],
            )
            db.executemany(
                "INSERT INTO items (item_id, license_id, organization_id, product, edition, deployment_type,"
                " license_type, quantity, period, domain, starts_at, expires_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (item_id) DO UPDATE SET product = excluded.product, edition = excluded.edition,"
                " deployment_type = excluded.deployment_type, license_type = excluded.license_type,"
                " quantity = excluded.quantity, period = excluded.period, domain = excluded.domain,"
                " starts_at = excluded.starts_at, expires_at = excluded.expires_at",
                [
                    (
                        i.item_id,
                        i.license_id,
                        i.organization_id,
                        i.product,
                        i.edition,
                        i.deployment_type.value,
                        i.license_type.value,
                        i.quantity,
                        i.period.value if i.period else None,
                        i.domain,
                        iso(i.starts_at),
                        iso(i.expires_at),
                    )
                    for r in b.licenses
                    for i in r.license.items
                ],
            )
        for name in b.codes_deleted:
            db.execute("DELETE FROM code_items WHERE code_name = ?", (name,))
            db.execute("DELETE FROM handshake_codes WHERE name = ?", (name,))
        for code in b.codes:
            now_ms = to_ms(b.at or utcnow())
            db.execute(
                "INSERT INTO handshake_codes (name, organization_id, is_default, source_license_id,"
                " custom_order, domains, app_ids, process_names, password_hash, created_ms, updated_ms)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (name) DO UPDATE SET custom_order = excluded.custom_order,"
                " domains = excluded.domains, app_ids = excluded.app_ids,"
                " process_names = excluded.process_names, password_hash = excluded.password_hash,"
                " updated_ms = excluded.updated_ms",
                (
                    code.name,
                    code.organization_id,
                    int(code.is_default),
                    code.source_license_id,
                    int(code.custom_order),
                    json.dumps(list(code.domains)),
                    json.dumps(list(code.app_ids)),
                    json.dumps(list(code.process_names)),
                    code.password_hash,
                    now_ms,
                    now_ms,
                ),
            )
            db.execute("DELETE FROM code_items WHERE code_name = ?", (code.name,))
            db.executemany(
                "INSERT INTO code_items (code_name, item_id, position) VALUES (?,?,?)",
                [(code.name, item_id, pos) for pos, item_id in enumerate(code.items)],
            )
        for org, code_name in b.organization_defaults.items():
            db.execute(
                "INSERT INTO organization_defaults (organization_id, code_name) VALUES (?,?)"
                " ON CONFLICT (organization_id) DO UPDATE SET code_name = excluded.code_name",
                (org, code_name),
            )
        if b.seat_claims:
            db.executemany(
                "INSERT INTO seats (item_id, client_uuid, granted_ms, refreshed_ms, expires_ms) VALUES (?,?,?,?,?)",
                [
                    (
                        c.seat.item_id,
                        c.seat.client_uuid,
                        to_ms(c.seat.granted_at),
                        to_ms(c.seat.refreshed_at),
                        to_ms(c.seat.expires_at),
                    )
                    for c in b.seat_claims
                ],
            )
            # One conditional counter update per item: the database itself
            # refuses to count past the limit, whatever the caller believed.
            per_item: dict[str, tuple[int, int]] = {}
            for c in b.seat_claims:
                n, _ = per_item.get(c.seat.item_id, (0, c.limit))
                per_item[c.seat.item_id] = (n + 1, c.limit)
            for item_id, (n, limit) in per_item.items():
                cur = db.execute(
                    "UPDATE items SET seats_used = seats_used + ? WHERE item_id = ? AND seats_used + ? <= ?",
                    (n, item_id, n, limit),
                )
                if cur.rowcount != 1:
                    raise Conflict(f"item {item_id} has no room for {n} more seats")
        if b.seat_refreshes:
            db.executemany(
                "UPDATE seats SET refreshed_ms = ?, expires_ms = ? WHERE item_id = ? AND client_uuid = ?",
                [(to_ms(s.refreshed_at), to_ms(s.expires_at), s.item_id, s.client_uuid) for s in b.seat_refreshes],
            )
        for s in b.seat_releases:
            cur = db.execute(
                "DELETE FROM seats WHERE item_id = ? AND client_uuid = ?", (s.item_id, s.client_uuid)
            )
            if cur.rowcount == 1:
                db.execute("UPDATE items SET seats_used = seats_used - 1 WHERE item_id = ?", (s.item_id,))
        for item_id, revoked in b.revocations.items():
            db.execute("UPDATE items SET revoked = ? WHERE item_id = ?", (int(revoked), item_id))
        if b.imports:
            db.executemany(
                "INSERT INTO import_files (path, sha256, state, reason, license_id, revision, seen_ms)"
                " VALUES (?,?,?,?,?,?,?) ON CONFLICT (path) DO UPDATE SET sha256 = excluded.sha256,"
                " state = excluded.state, reason = excluded.reason, license_id = excluded.license_id,"
                " revision = excluded.revision, seen_ms = excluded.seen_ms",
                [(r.path, r.sha256, r.state, r.reason, r.license_id, r.revision, to_ms(r.seen_at)) for r in b.imports],
            )
        if b.authorizations:
            db.executemany(
                "INSERT INTO authorizations (code, client_uuid, item_id, instances, granted_ms, expires_ms)"
                " VALUES (?,?,?,?,?,?) ON CONFLICT (code, client_uuid) DO UPDATE SET item_id = excluded.item_id,"
                " instances = excluded.instances, granted_ms = excluded.granted_ms,"
                " expires_ms = excluded.expires_ms",
                [(a.code, a.client_uuid, a.item_id, a.instances, to_ms(a.granted_at), to_ms(a.expires_at))
                 for a in b.authorizations],
            )
        if b.usage_reports:
            db.executemany(
                "INSERT INTO usage_reports (report_id, client_uuid, code, received_ms) VALUES (?,?,?,?)"
                " ON CONFLICT (report_id) DO NOTHING",
                [(r.report_id, r.client_uuid, r.code, to_ms(r.received_at)) for r in b.usage_reports],
            )
        for item_id, units in b.unit_charges.items():
            db.execute("UPDATE items SET units_used = units_used + ? WHERE item_id = ?", (units, item_id))
        if b.events:
            db.executemany(
                "INSERT INTO events (at_ms, type, code, item_id, client_uuid, product, deployment_type, result,"
                " detail, units, instances) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        to_ms(e.at),
                        e.type,
                        e.code,
                        e.item_id,
                        e.client_uuid,
                        e.product,
                        e.deployment_type,
                        e.result,
                        json.dumps(e.detail, separators=(",", ":")) if e.detail else None,
                        e.units,
                        e.instances,
                    )
                    for e in b.events
                ],
            )

    async def events(self, query: EventQuery) -> AsyncIterator[StoredEvent]:
        """Stream events in order, a page at a time, so memory stays flat."""
        where, params = [], []
        if query.start:
            where.append("at_ms >= ?")
            params.append(to_ms(query.start))
        if query.end:
            where.append("at_ms < ?")
            params.append(to_ms(query.end))
        for column, value in (("code", query.code), ("item_id", query.item_id), ("type", query.type)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        after = 0
        while True:
            clause = " AND ".join(["seq > ?", *where])
            rows = await self._all(
                "SELECT seq, at_ms, type, code, item_id, client_uuid, product, deployment_type, result, detail,"
                f" units, instances FROM events WHERE {clause} ORDER BY seq LIMIT 1000",
                [after, *params],
            )
            if not rows:
                return
            for r in rows:
                yield StoredEvent(
                    r[0],
                    Event(
                        at=from_ms(r[1]),
                        type=r[2],
                        code=r[3],
                        item_id=r[4],
                        client_uuid=r[5],
                        product=r[6],
                        deployment_type=r[7],
                        result=r[8],
                        detail=json.loads(r[9]) if r[9] else None,
                        units=r[10],
                        instances=r[11],
                    ),
                )
            after = rows[-1][0]

    async def report_seen(self, report_id: str) -> bool:
        rows = await self._all("SELECT 1 FROM usage_reports WHERE report_id = ?", (report_id,))
        return bool(rows)

    async def rollup_lag(self) -> int:
        """Events written but not yet in the rollups."""
        rows = await self._all(
            "SELECT COALESCE(MAX(seq), 0) - (SELECT last_seq FROM rollup_state WHERE id = 1) FROM events"
        )
        return max(0, rows[0][0])

    async def roll_up(self, quantities: dict[str, tuple[str, int]], limit: int = 50_000) -> RollupResult:
        """Fold the next events of the log into the rollups, in one transaction."""
        try:
            return await self.db._execute(self._roll_up_in_thread, quantities, limit)
        except sqlite3.Error as e:
            raise _translate(e, self.path) from None

    def _roll_up_in_thread(self, quantities: dict[str, tuple[str, int]], limit: int) -> RollupResult:
        con: sqlite3.Connection = self.db._conn
        con.execute("BEGIN IMMEDIATE")
        try:
            last = con.execute("SELECT last_seq FROM rollup_state WHERE id = 1").fetchone()[0]
            rows = con.execute(
                "SELECT seq, at_ms, type, code, item_id, client_uuid, result, units, instances FROM events"
                " WHERE seq > ? AND type IN ('handshake', 'usage.record') ORDER BY seq LIMIT ?",
                (last, limit),
            ).fetchall()
            end = con.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            if len(rows) == limit:
                end = rows[-1][0]
            result = self._apply_rollup(con, [EventFacts(*r) for r in rows], quantities, end)
            con.execute("UPDATE rollup_state SET last_seq = ? WHERE id = 1", (end,))
            con.commit()
            return result
        except BaseException:
            con.rollback()
            raise

    @staticmethod
    def _apply_rollup(con: sqlite3.Connection, events: list[EventFacts], quantities: dict[str, tuple[str, int]],
                      end: int) -> RollupResult:
        agg = aggregate(events)
        con.executemany(
            "INSERT INTO rollups (scope, key, size, bucket_ms, granted, refused, units) VALUES (?,?,?,?,?,?,?)"
            " ON CONFLICT (scope, key, size, bucket_ms) DO UPDATE SET granted = granted + excluded.granted,"
            " refused = refused + excluded.refused, units = units + excluded.units",
            [(*k, c.granted, c.refused, c.units) for k, c in agg.counters.items()],
        )
        overuse: dict[str, int] = {}
        for (scope, key, size, bucket), seen in agg.devices.items():
            instance_item = scope == "item" and quantities.get(key, ("", 0))[0] == "per-concurrent-instance"
            if instance_item and size == "3m":
                # Instance-slices need to know which servers are new in the slice.
                new, added = 0, 0
                for client, instances in seen.items():
                    row = con.execute(
                        "SELECT instances FROM rollup_devices WHERE scope = ? AND key = ? AND size = ?"
                        " AND bucket_ms = ? AND client_uuid = ?", (scope, key, size, bucket, client)).fetchone()
                    if row is None:
                        con.execute(
                            "INSERT INTO rollup_devices (scope, key, size, bucket_ms, client_uuid, instances)"
                            " VALUES (?,?,?,?,?,?)", (scope, key, size, bucket, client, instances))
                        new += 1
                        added += instances
                    elif instances > row[0]:
                        # Seen by its handshake first (no instances), now by its report.
                        con.execute(
                            "UPDATE rollup_devices SET instances = ? WHERE scope = ? AND key = ? AND size = ?"
                            " AND bucket_ms = ? AND client_uuid = ?", (instances, scope, key, size, bucket, client))
                        added += instances - row[0]
                if added:
                    row = con.execute("SELECT instances FROM rollups WHERE scope = ? AND key = ? AND size = ?"
                                      " AND bucket_ms = ?", (scope, key, size, bucket)).fetchone()
                    before = row[0] if row else 0
                    overuse[key] = overuse.get(key, 0) + overuse_delta(before, before + added, quantities[key][1])
            else:
                cur = con.executemany(
                    "INSERT INTO rollup_devices (scope, key, size, bucket_ms, client_uuid, instances)"
                    " VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                    [(scope, key, size, bucket, client, instances) for client, instances in seen.items()])
                new, added = cur.rowcount, 0
            if new or added:
                con.execute(
                    "INSERT INTO rollups (scope, key, size, bucket_ms, devices, instances) VALUES (?,?,?,?,?,?)"
                    " ON CONFLICT (scope, key, size, bucket_ms) DO UPDATE SET devices = devices + excluded.devices,"
                    " instances = instances + excluded.instances",
                    (scope, key, size, bucket, new, added),
                )
        overuse = {k: v for k, v in overuse.items() if v}
        for item_id, delta in overuse.items():
            # The overuse counter moves with the rollup, in its transaction.
            con.execute(
                "UPDATE items SET overuse_used = overuse_used + ?,"
                " overused = CASE WHEN overuse_used + ? >= ? THEN 1 ELSE overused END WHERE item_id = ?",
                (delta, delta, tolerance(quantities[item_id][1]), item_id),
            )
        return RollupResult(len(events), end, overuse)

    async def rollups_at(self, scope: str, size: str, bucket_ms: int) -> dict[str, RollupRow]:
        rows = await self._all(
            "SELECT key, bucket_ms, granted, refused, units, devices, instances FROM rollups"
            " WHERE scope = ? AND size = ? AND bucket_ms = ?", (scope, size, bucket_ms))
        return {r[0]: RollupRow(*r[1:]) for r in rows}

    async def rollup_series(self, scope: str, key: str, size: str, start_ms: int, end_ms: int) -> list[RollupRow]:
        rows = await self._all(
            "SELECT bucket_ms, granted, refused, units, devices, instances FROM rollups"
            " WHERE scope = ? AND key = ? AND size = ? AND bucket_ms >= ? AND bucket_ms < ? ORDER BY bucket_ms",
            (scope, key, size, start_ms, end_ms),
        )
        return [RollupRow(*r) for r in rows]

    # -- the admin account ----------------------------------------------------

    async def _transaction(self, fn, *args):  # noqa: ANN001, ANN202
        def run():  # noqa: ANN202
            con: sqlite3.Connection = self.db._conn
            con.execute("BEGIN IMMEDIATE")
            try:
                result = fn(con, *args)
            except BaseException:
                con.rollback()
                raise
            con.commit()
            return result

        try:
            return await self.db._execute(run)
        except sqlite3.Error as e:
            raise _translate(e, self.path) from None

    async def admin_password_hash(self) -> str | None:
        rows = await self._all("SELECT password_hash FROM admin WHERE id = 1")
        return rows[0][0] if rows else None

    async def set_admin_password(self, password_hash: str, at_ms: int, only_if_unset: bool = False) -> bool:
        """Set the password and end every session; with only_if_unset, False when one was already set."""

        def run(con: sqlite3.Connection) -> bool:
            if only_if_unset and con.execute("SELECT 1 FROM admin WHERE id = 1").fetchone():
                return False
            con.execute(
                "INSERT INTO admin (id, password_hash, changed_ms) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE"
                " SET password_hash = excluded.password_hash, changed_ms = excluded.changed_ms",
                (password_hash, at_ms))
            con.execute("DELETE FROM admin_tokens")
            return True

        return await self._transaction(run)

    async def add_admin_token(self, token_hash: str, at_ms: int, expires_ms: int) -> None:
        def run(con: sqlite3.Connection) -> None:
            con.execute("DELETE FROM admin_tokens WHERE expires_ms <= ?", (at_ms,))
            con.execute("INSERT INTO admin_tokens (token_hash, created_ms, expires_ms) VALUES (?,?,?)",
                        (token_hash, at_ms, expires_ms))

        await self._transaction(run)

    async def admin_token_expiry(self, token_hash: str) -> int | None:
        rows = await self._all("SELECT expires_ms FROM admin_tokens WHERE token_hash = ?", (token_hash,))
        return rows[0][0] if rows else None

    async def delete_admin_token(self, token_hash: str) -> None:
        await self._transaction(lambda con: con.execute("DELETE FROM admin_tokens WHERE token_hash = ?",
                                                        (token_hash,)))

    async def prune_rollup_marks(self, before_ms: int) -> int:
        """Forget who was active in buckets that ended before before_ms (no report can reach them any more)."""

        def run(con: sqlite3.Connection) -> int:
            total = 0
            for size, width in BUCKETS.items():
                cur = con.execute("DELETE FROM rollup_devices WHERE size = ? AND bucket_ms + ? <= ?",
                                  (size, width, before_ms))
                total += cur.rowcount
            return total

        return await self._transaction(run)
