"""The SQL every store runs, written once as procedures that yield statements (no I/O here).

A procedure is a generator: it yields a `Query` (answered with its rows), an
`Exec` (answered with the number of rows it changed) or a `Many` (one
statement over many parameter rows, answered with None), and returns its
result. `SQLiteStore` drives them with sqlite3 on its database thread,
`PostgresStore` with asyncpg; both inside one transaction per procedure.
The SQL is the portable subset both speak, with `?` placeholders (the
PostgreSQL runner numbers them).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from lts_server.core.model import (
    DeploymentType,
    HandshakeCode,
    Item,
    ItemStatus,
    License,
    LicenseType,
    Period,
)
from lts_server import usagechain
from lts_server.core.times import from_ms, iso, parse_iso, to_ms, utcnow
from lts_server.core.marks import ClientMarks, Marks, decode_day, encode_client, encode_day
from lts_server.core.usage import (
    DAY_MS,
    MARKS_DAYS,
    MONTH,
    SLICE_MS,
    Bucket,
    Counters,
    EventFacts,
    Key,
    activities,
    bucket_start,
    convert_mark,
    days_touched,
    fold,
    month_index,
    month_start_ms,
    overuse_delta,
    tolerance,
)
from lts_server.store import sql_leases, sql_offline
from lts_server.store import (
    AuthorizationRecord,
    Conflict,
    Event,
    EventQuery,
    Holder,
    ImportRecord,
    LicenseRecord,
    Reloaded,
    RollupResult,
    RollupRow,
    Seat,
    SeatChange,
    SeatOp,
    Snapshot,
    StoredEvent,
    WriteBatch,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Query:
    sql: str
    params: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Exec:
    sql: str
    params: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Many:
    """One INSERT ... VALUES (?, ...) for each row. With `columns` (the PostgreSQL type of each value, in
    order), PostgreSQL takes all the rows in one statement, their columns as arrays (the rows then must not
    repeat a conflict key: one statement may not update a row twice); SQLite runs the rows one by one."""

    sql: str
    rows: list[tuple[Any, ...]]
    columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryIn:
    """The rows of `sql`, a SELECT ending in a column, whose column is one of `values` (after `params`).
    SQLite gets IN (?, ...) lists of IN_CHUNK values. PostgreSQL gets one statement with the values as an
    array of `kind` (its type: text, bigint): with IN (SELECT unnest(...)) it probes the key, or below ~100,000
    rows hashes the values and reads the table, where an IN list of 500 made it check every row of such a
    table against the list (5-11 ms a list of 500, 1.6-3 with the array; docs/design.md, "Rows among many
    values")."""

    sql: str
    values: list[Any]
    kind: str = "text"
    params: tuple[Any, ...] = ()


Statement = Query | Exec | Many | QueryIn
Procedure = Generator[Statement, Any, T]
# A place in the event log: (tx, seq) of the last event read (see LogOrder).
Position = tuple[int, int]


@dataclass(frozen=True)
class LogOrder:
    """How a store's event log is read so that every reader sees each event once, in one order.

    SQLite has one writer: sequence numbers commit in order and `seq` is the
    order (`tx` is always 0). A PostgreSQL cluster commits in parallel, so a
    number can commit after a larger one; there the log is read in (tx, seq)
    order (tx: the writing transaction's xid8) and only below the horizon,
    the oldest transaction still in flight: events of older transactions can
    no longer appear, so a reader that has passed a point never finds an
    event behind it. Each node writes its transactions one after another, so
    its own events keep their order in both (its usage chain follows them).
    """

    horizon: str  # SQL for the horizon: events with tx below it are final
    sequential: bool  # True: seq alone orders the log (one writer)

    @property
    def after(self) -> str:
        """A WHERE clause: after the position given by after_params."""
        return "seq > ?" if self.sequential else "(tx, seq) > (?, ?)"

    @property
    def order(self) -> str:
        return "seq" if self.sequential else "tx, seq"

    def after_params(self, position: Position) -> tuple[int, ...]:
        return (position[1],) if self.sequential else position

    def end(self, horizon: int) -> Procedure[Position]:
        """The position after every event below `horizon`."""
        if not self.sequential:
            return horizon, 0
        return 0, (yield Query("SELECT COALESCE(MAX(seq), 0) FROM events"))[0][0]


SEQUENTIAL = LogOrder(horizon="1", sequential=True)

AUTHORIZATION_COLUMNS = "code, client_uuid, item_id, instances, granted_ms, expires_ms"
EVENT_COLUMNS = "seq, at_ms, type, code, item_id, client_uuid, product, deployment_type, result, detail, units, instances"
PAGE = 1000
# json.dumps with separators builds an encoder per call: three times the cost of encoding with this one,
# for the detail of most events (the database thread holds the interpreter lock meanwhile).
_compact_json = json.JSONEncoder(separators=(",", ":")).encode
# Values in one IN (...) list: well below SQLite's and PostgreSQL's parameter limits.
IN_CHUNK = 500


# -- loading ----------------------------------------------------------------------------------------


def _item(row: tuple[Any, ...]) -> Item:
    return Item(
        item_id=row[0], license_id=row[1], organization_id=row[2], product=row[3], edition=row[4],
        deployment_type=DeploymentType(row[5]), license_type=LicenseType(row[6]), quantity=row[7],
        period=Period(row[8]) if row[8] else None, domain=row[9], starts_at=parse_iso(row[10]),
        expires_at=parse_iso(row[11]), borrow_max_days=row[12], versions=row[13],
    )


def _status(row: tuple[Any, ...]) -> ItemStatus:
    return ItemStatus(revoked=bool(row[0]), seats_used=row[1], units_used=row[2], overuse_used=row[3],
                      overused=bool(row[4]))


ITEM_COLUMNS = ("item_id, license_id, organization_id, product, edition, deployment_type, license_type, quantity,"
                " period, domain, starts_at, expires_at, borrow_max_days, versions")
SEAT_COLUMNS = "item_id, client_uuid, granted_ms, refreshed_ms, expires_ms, code, borrowed_until_ms"
# seats_used counts seats leased to nodes of a cluster too (store/sql_leases.py): the seats held are the rest.
STATUS_COLUMNS = ("revoked, seats_used - COALESCE((SELECT SUM(l.seats) FROM seat_leases l"
                  " WHERE l.item_id = items.item_id), 0), units_used, overuse_used, overused")


def load_snapshot(per_slice_types: tuple[str, ...], now_ms: int) -> Procedure[Snapshot]:
    """The catalog and the live authorizations of items counted per time slice; no other device rows
    (those are read per device when it asks: lts_server/devices.py)."""
    snap = yield from load_catalog()
    per_slice = [i.item_id for i in snap.items.values() if i.license_type.value in per_slice_types]
    if per_slice:  # no index leads there: a scan of the authorizations, only when such items exist
        for row in (yield from _select_in(
                f"SELECT {AUTHORIZATION_COLUMNS} FROM authorizations WHERE expires_ms > ? AND item_id", per_slice,
                now_ms)):
            auth = authorization_row(row)
            snap.authorizations[(auth.code, auth.client_uuid)] = auth
    return snap


def load_catalog() -> Procedure[Snapshot]:
    """Everything but the seats and authorizations: licenses, items with their counters, codes, imports."""
    snap = Snapshot()
    items_by_license: dict[str, list[Item]] = {}
    for row in (yield Query(f"SELECT {ITEM_COLUMNS}, {STATUS_COLUMNS} FROM items ORDER BY item_id")):
        item = _item(row)
        snap.items[item.item_id] = item
        snap.statuses[item.item_id] = _status(row[14:])
        items_by_license.setdefault(item.license_id, []).append(item)
    for row in (yield Query(
        "SELECT license_id, alias, organization_id, license_text_version, status, revision, server_uuid,"
        " issued_at, key_id, sha256, file_text, first_imported_ms, updated_ms, server_key FROM licenses"
    )):
        lic = License(
            license_id=row[0], alias=row[1], organization_id=row[2], license_text_version=row[3], status=row[4],
            revision=row[5], server_uuid=row[6], issued_at=parse_iso(row[7]),
            items=tuple(items_by_license.get(row[0], ())), server_key=row[13],
        )
        snap.licenses[lic.license_id] = LicenseRecord(lic, row[8], row[9], row[10], from_ms(row[11]),
                                                      from_ms(row[12]))
    members: dict[str, list[str]] = {}
    for code_name, item_id in (yield Query("SELECT code_name, item_id FROM code_items ORDER BY code_name, position")):
        members.setdefault(code_name, []).append(item_id)
    limits, snap.code_seats = yield from sql_offline.load_code_limits()
    for row in (yield Query(
        "SELECT name, organization_id, is_default, source_license_id, custom_order, domains, app_ids,"
        " process_names, password_hash, borrow_max_days FROM handshake_codes"
    )):
        snap.codes[row[0]] = HandshakeCode(
            name=row[0], organization_id=row[1], is_default=bool(row[2]), source_license_id=row[3],
            custom_order=bool(row[4]), domains=tuple(json.loads(row[5])), app_ids=tuple(json.loads(row[6])),
            process_names=tuple(json.loads(row[7])), password_hash=row[8], items=tuple(members.get(row[0], ())),
            borrow_max_days=row[9], seat_limits=limits.get(row[0], ()),
        )
    for org, code_name in (yield Query("SELECT organization_id, code_name FROM organization_defaults")):
        snap.organization_defaults[org] = code_name
    for row in (yield Query("SELECT path, sha256, state, reason, license_id, revision, seen_ms FROM import_files")):
        snap.imports[row[0]] = ImportRecord(path=row[0], sha256=row[1], state=row[2], reason=row[3],
                                            license_id=row[4], revision=row[5], seen_at=from_ms(row[6]))
    return snap


def device_rows(clients: set[str]) -> Procedure[tuple[list[Seat], list[AuthorizationRecord], dict[str, str]]]:
    """Every seat and authorization of `clients`, and the fingerprints they are bound to."""
    seats = [seat_row(r) for r in (yield from _select_in(f"SELECT {SEAT_COLUMNS} FROM seats WHERE client_uuid", clients))]
    auths = [authorization_row(r) for r in (yield from _select_in(
        f"SELECT {AUTHORIZATION_COLUMNS} FROM authorizations WHERE client_uuid", clients))]
    bound = dict((yield from _select_in("SELECT client_uuid, fingerprint FROM device_bindings WHERE client_uuid",
                                        clients)))
    return seats, auths, bound


def reload(items: set[str], clients: set[str]) -> Procedure[Reloaded]:
    """What other nodes may have changed: the counters of `items` (and of the items the devices sit on),
    every seat and authorization of `clients`."""
    seats, auths, bound = yield from device_rows(clients)
    touched = items | {s.item_id for s in seats}
    rows = yield from _select_in(f"SELECT item_id, {STATUS_COLUMNS} FROM items WHERE item_id", touched)
    return Reloaded({r[0]: _status(r[1:]) for r in rows}, seats, auths, bound,
                    (yield from sql_offline.code_seat_counts(touched)))


def lapsed_seats(now_ms: int, limit: int) -> Procedure[list[Seat]]:
    """Seats whose active period ended by `now_ms`, the oldest first (index seats_expiry)."""
    return [seat_row(r) for r in (yield Query(
        f"SELECT {SEAT_COLUMNS} FROM seats WHERE expires_ms <= ? ORDER BY expires_ms LIMIT ?", (now_ms, limit)))]


def item_seats(item_id: str, limit: int, offset: int) -> Procedure[list[Seat]]:
    """An item's seats in the order they were granted, a page at a time."""
    return [seat_row(r) for r in (yield Query(
        f"SELECT {SEAT_COLUMNS} FROM seats WHERE item_id = ? ORDER BY granted_ms, client_uuid LIMIT ? OFFSET ?",
        (item_id, limit, offset)))]


def item_holders(item_id: str, seats: bool, now_ms: int, limit: int, offset: int
                 ) -> Procedure[tuple[int, list[Holder]]]:
    """Who holds the item, a page at a time, and how many in all: its seats with the code of the device's
    latest authorization there (seat-counted items), or its authorizations still running (the others)."""
    if seats:
        total = (yield Query("SELECT COUNT(*) FROM seats WHERE item_id = ?", (item_id,)))[0][0]
        rows = yield Query(
            "SELECT 'seat', s.client_uuid, s.granted_ms, s.refreshed_ms, s.expires_ms, (SELECT a.code FROM"
            " authorizations a WHERE a.client_uuid = s.client_uuid AND a.item_id = s.item_id"
            " ORDER BY a.granted_ms DESC LIMIT 1), s.borrowed_until_ms FROM seats s WHERE s.item_id = ?"
            " ORDER BY s.granted_ms, s.client_uuid LIMIT ? OFFSET ?", (item_id, limit, offset))
    else:
        total = (yield Query("SELECT COUNT(*) FROM authorizations WHERE item_id = ? AND expires_ms > ?",
                             (item_id, now_ms)))[0][0]
        rows = yield Query(
            "SELECT 'grant', a.client_uuid, a.granted_ms, a.granted_ms, a.expires_ms, a.code, (SELECT"
            " s.borrowed_until_ms FROM seats s WHERE s.item_id = a.item_id AND s.client_uuid = a.client_uuid)"
            " FROM authorizations a WHERE a.item_id = ? AND a.expires_ms > ?"
            " ORDER BY a.granted_ms, a.client_uuid, a.code LIMIT ? OFFSET ?",
            (item_id, now_ms, limit, offset))
    return int(total), [Holder(r[0], r[1], from_ms(r[2]), from_ms(r[3]), from_ms(r[4]), r[5],
                               from_ms(r[6]) if r[6] is not None and r[6] > now_ms else None) for r in rows]


def _select_in(select: str, values: set[Any] | list[Any], *before: Any, kind: str = "text"
               ) -> Procedure[list[tuple[Any, ...]]]:
    """`select` ending in a column, with IN (values): see QueryIn."""
    if not values:
        return []
    return (yield QueryIn(select, sorted(values), kind, before))


@dataclass(frozen=True)
class IdentityRow:
    server_uuid: str
    signing_key_pem: str
    secret_hex: str


def cluster_identity(candidate: IdentityRow) -> Procedure[IdentityRow]:
    rows = yield Query("SELECT server_uuid, signing_key_pem, secret_hex FROM cluster_identity WHERE id = 1")
    if rows:
        return IdentityRow(*rows[0])
    yield Exec("INSERT INTO cluster_identity (id, server_uuid, signing_key_pem, secret_hex) VALUES (1, ?, ?, ?)",
               (candidate.server_uuid, candidate.signing_key_pem, candidate.secret_hex))
    return candidate


def seat_row(row: Sequence[Any]) -> Seat:
    return Seat(row[0], row[1], from_ms(row[2]), from_ms(row[3]), from_ms(row[4]), row[5],
                from_ms(row[6]) if row[6] is not None else None)


def authorization_row(row: Sequence[Any]) -> AuthorizationRecord:
    return AuthorizationRecord(row[0], row[1], row[2], row[3], from_ms(row[4]), from_ms(row[5]))


# -- writing ----------------------------------------------------------------------------------------


def write_batch(b: WriteBatch, chain: usagechain.Head | None = None,
                leasing: sql_leases.Leasing | None = None) -> Procedure[usagechain.Head | None]:
    """Every change of the batch, in one transaction (the caller's). With a chain, the events are linked onto
    it and its head moves with them; returns the new head (the caller keeps it once the commit is done).
    With `leasing` (a cluster node), leasable claims may use seat leases (store/sql_leases.py)."""
    if b.licenses or b.code_limits:  # leases were taken within the items' quantities and reservations as they were
        yield from sql_leases.return_leases(sorted({i.item_id for r in b.licenses for i in r.license.items}
                                                   | {item for limits in b.code_limits for item in limits.items}))
    if b.licenses:
        yield Many(
            "INSERT INTO licenses (license_id, alias, organization_id, license_text_version, status,"
            " revision, server_uuid, issued_at, key_id, sha256, file_text, first_imported_ms, updated_ms, server_key)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (license_id) DO UPDATE SET alias = excluded.alias,"
            " organization_id = excluded.organization_id,"
            " license_text_version = excluded.license_text_version, status = excluded.status,"
            " revision = excluded.revision, server_uuid = excluded.server_uuid,"
            " issued_at = excluded.issued_at, key_id = excluded.key_id, sha256 = excluded.sha256,"
            " file_text = excluded.file_text, updated_ms = excluded.updated_ms, server_key = excluded.server_key",
            [(r.license.license_id, r.license.alias, r.license.organization_id, r.license.license_text_version,
              r.license.status, r.license.revision, r.license.server_uuid, iso(r.license.issued_at), r.key_id,
              r.sha256, r.file_text, to_ms(r.first_imported_at), to_ms(r.updated_at), r.license.server_key)
             for r in b.licenses],
        )
        yield Many(
            f"INSERT INTO items ({ITEM_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (item_id) DO UPDATE SET product = excluded.product, edition = excluded.edition,"
            " deployment_type = excluded.deployment_type, license_type = excluded.license_type,"
            " quantity = excluded.quantity, period = excluded.period, domain = excluded.domain,"
            " starts_at = excluded.starts_at, expires_at = excluded.expires_at,"
            " borrow_max_days = excluded.borrow_max_days, versions = excluded.versions",
            [(i.item_id, i.license_id, i.organization_id, i.product, i.edition, i.deployment_type.value,
              i.license_type.value, i.quantity, i.period.value if i.period else None, i.domain, iso(i.starts_at),
              iso(i.expires_at), i.borrow_max_days, i.versions) for r in b.licenses for i in r.license.items],
        )
    for name in b.codes_deleted:
        yield Exec("DELETE FROM code_items WHERE code_name = ?", (name,))
        yield Exec("DELETE FROM handshake_codes WHERE name = ?", (name,))
    now_ms = to_ms(b.at or utcnow())
    for code in b.codes:
        yield Exec(
            "INSERT INTO handshake_codes (name, organization_id, is_default, source_license_id,"
            " custom_order, domains, app_ids, process_names, password_hash, created_ms, updated_ms, borrow_max_days)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (name) DO UPDATE SET custom_order = excluded.custom_order,"
            " domains = excluded.domains, app_ids = excluded.app_ids,"
            " process_names = excluded.process_names, password_hash = excluded.password_hash,"
            " updated_ms = excluded.updated_ms, borrow_max_days = excluded.borrow_max_days",
            (code.name, code.organization_id, int(code.is_default), code.source_license_id, int(code.custom_order),
             json.dumps(list(code.domains)), json.dumps(list(code.app_ids)), json.dumps(list(code.process_names)),
             code.password_hash, now_ms, now_ms, code.borrow_max_days),
        )
        yield Exec("DELETE FROM code_items WHERE code_name = ?", (code.name,))
        yield Many("INSERT INTO code_items (code_name, item_id, position) VALUES (?,?,?)",
                   [(code.name, item_id, pos) for pos, item_id in enumerate(code.items)])
    for org, code_name in b.organization_defaults.items():
        yield Exec(
            "INSERT INTO organization_defaults (organization_id, code_name) VALUES (?,?)"
            " ON CONFLICT (organization_id) DO UPDATE SET code_name = excluded.code_name",
            (org, code_name),
        )
    for change in b.seat_changes:
        yield from _seat_change(change, leasing)
    # After the seats: the limits count the seats the batch's claims and releases leave.
    for limits in b.code_limits:
        yield from sql_offline.write_code_limits(limits)
    for item_id, revoked in b.revocations.items():
        yield Exec("UPDATE items SET revoked = ? WHERE item_id = ?", (int(revoked), item_id))
    if b.imports:
        yield Many(
            "INSERT INTO import_files (path, sha256, state, reason, license_id, revision, seen_ms)"
            " VALUES (?,?,?,?,?,?,?) ON CONFLICT (path) DO UPDATE SET sha256 = excluded.sha256,"
            " state = excluded.state, reason = excluded.reason, license_id = excluded.license_id,"
            " revision = excluded.revision, seen_ms = excluded.seen_ms",
            [(r.path, r.sha256, r.state, r.reason, r.license_id, r.revision, to_ms(r.seen_at)) for r in b.imports],
        )
    if b.authorizations:
        yield Many(
            "INSERT INTO authorizations (code, client_uuid, item_id, instances, granted_ms, expires_ms)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT (code, client_uuid) DO UPDATE SET item_id = excluded.item_id,"
            " instances = excluded.instances, granted_ms = excluded.granted_ms, expires_ms = excluded.expires_ms",
            [(a.code, a.client_uuid, a.item_id, a.instances, to_ms(a.granted_at), to_ms(a.expires_at))
             for a in b.authorizations],
        )
    for job, r in b.usage_reports:
        counted = yield Exec(
            "INSERT INTO usage_reports (report_id, client_uuid, code, received_ms) VALUES (?,?,?,?)"
            " ON CONFLICT (report_id) DO NOTHING",
            (r.report_id, r.client_uuid, r.code, to_ms(r.received_at)),
        )
        if counted != 1:  # counted meanwhile by another node
            raise Conflict(f"usage report {r.report_id} was already counted", job)
    for span in b.borrows:
        yield from sql_offline.write_borrow_span(span)
    for item_id, units in b.unit_charges.items():
        yield Exec("UPDATE items SET units_used = units_used + ? WHERE item_id = ?", (units, item_id))
    for extra in b.extras:
        yield from extra()
    if b.events:
        rows = event_rows(b.events)
        if chain is None:
            yield Many("INSERT INTO events (at_ms, type, code, item_id, client_uuid, product, deployment_type, result,"
                       " detail, units, instances) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        else:
            chain, rows = yield from usagechain.append(chain, rows, now_ms)
            yield Many("INSERT INTO events (at_ms, type, code, item_id, client_uuid, product, deployment_type, result,"
                       " detail, units, instances, chain, chain_seq, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    return chain


def event_rows(events: list[Event]) -> list[tuple[Any, ...]]:
    """Events as the rows the events table takes: at_ms, type, code, item_id, client_uuid, product,
    deployment_type, result, detail, units, instances (usagechain.Row)."""
    return [(to_ms(e.at), e.type, e.code, e.item_id, e.client_uuid, e.product, e.deployment_type, e.result,
             _compact_json(e.detail) if e.detail else None, e.units, e.instances) for e in events]


def _seat_change(change: SeatChange, leasing: sql_leases.Leasing | None = None) -> Procedure[None]:
    s = change.seat
    if change.op is SeatOp.CLAIM:
        # Conditional writes: the database itself refuses to count past the
        # limit or to seat a device twice, whatever the caller believed.
        if change.exclusive_of:
            marks = ",".join("?" * len(change.exclusive_of))
            held = yield Query(f"SELECT item_id FROM seats WHERE client_uuid = ? AND item_id IN ({marks})",
                               (s.client_uuid, *change.exclusive_of))
            if held:
                raise Conflict(f"device {s.client_uuid} already holds a seat on item {held[0][0]} of the code",
                               change.job)
        if change.limited:
            yield from sql_offline.claim_code_seat(change)
        if change.reserved:  # one of the code's own reserved seats: only the limit itself bounds it
            room = yield Exec("UPDATE items SET seats_used = seats_used + 1,"
                              " seats_reserved_unused = seats_reserved_unused - 1"
                              " WHERE item_id = ? AND seats_used < ? AND seats_reserved_unused > 0",
                              (s.item_id, change.limit))
        elif leasing is not None and change.leasable:
            room = yield from sql_leases.claim(change, leasing)
        else:  # other codes' unused reserved seats stay free
            room = yield Exec("UPDATE items SET seats_used = seats_used + 1"
                              " WHERE item_id = ? AND seats_used + seats_reserved_unused < ?", (s.item_id, change.limit))
        if room != 1 and leasing is not None and not change.reserved:
            # Full, but for seats other nodes leased and have not granted: every seat is granted before a refusal.
            room = yield from sql_leases.take_leased(s.item_id, change.limit)
        if room != 1:
            raise Conflict(f"item {s.item_id} has no room for another seat (limit {change.limit})", change.job)
        seated = yield Exec(
            f"INSERT INTO seats ({SEAT_COLUMNS}) VALUES (?,?,?,?,?,?,?) ON CONFLICT (item_id, client_uuid) DO NOTHING",
            (s.item_id, s.client_uuid, to_ms(s.granted_at), to_ms(s.refreshed_at), to_ms(s.expires_at), s.code,
             to_ms(s.borrowed_until) if s.borrowed_until else None),
        )
        if seated != 1:
            raise Conflict(f"device {s.client_uuid} already holds a seat on item {s.item_id}", change.job)
    elif change.op is SeatOp.REFRESH:
        found = yield Exec("UPDATE seats SET refreshed_ms = ?, expires_ms = ?, borrowed_until_ms = ?"
                           " WHERE item_id = ? AND client_uuid = ?",
                           (to_ms(s.refreshed_at), to_ms(s.expires_at),
                            to_ms(s.borrowed_until) if s.borrowed_until else None, s.item_id, s.client_uuid))
        if found != 1:  # released meanwhile by another node
            raise Conflict(f"device {s.client_uuid} no longer holds a seat on item {s.item_id}", change.job)
    else:
        if (yield Exec("DELETE FROM seats WHERE item_id = ? AND client_uuid = ?", (s.item_id, s.client_uuid))) != 1:
            # Released meanwhile by another node (its sweep, an admin): this release would count twice.
            raise Conflict(f"device {s.client_uuid} no longer holds a seat on item {s.item_id}", change.job)
        if change.limited:
            yield from sql_offline.release_code_seat(change)
        else:
            yield Exec("UPDATE items SET seats_used = seats_used - 1 WHERE item_id = ?", (s.item_id,))


# -- reading ------------------------------------------------------------------------------------------


def log_horizon(log: LogOrder) -> Procedure[int]:
    """The horizon now: every event with tx below it is committed or never will be."""
    return (yield Query(f"SELECT {log.horizon}"))[0][0]


def log_position(log: LogOrder) -> Procedure[Position]:
    """The position after every final event: a reader starting there reads only what comes after."""
    return (yield from log.end((yield from log_horizon(log))))


def events_page(query: EventQuery, after: int, below_tx: int) -> Procedure[list[StoredEvent]]:
    """A page of events in sequence order, of transactions below `below_tx` (a horizon taken once for a
    whole export: those events are final, so paging by number over them misses none)."""
    where: list[str] = ["seq > ?", "tx < ?"]
    params: list[Any] = [after, below_tx]
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
    rows = yield Query(f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY seq LIMIT {PAGE}",
                       tuple(params))
    return [stored_event(r) for r in rows]


def stored_event(r: tuple[Any, ...]) -> StoredEvent:
    return StoredEvent(r[0], Event(
        at=from_ms(r[1]), type=r[2], code=r[3], item_id=r[4], client_uuid=r[5], product=r[6],
        deployment_type=r[7], result=r[8], detail=json.loads(r[9]) if r[9] else None, units=r[10],
        instances=r[11]))


def report_seen(report_id: str) -> Procedure[bool]:
    return bool((yield Query("SELECT 1 FROM usage_reports WHERE report_id = ?", (report_id,))))


def rollup_position() -> Procedure[Position]:
    row = (yield Query("SELECT last_tx, last_seq FROM rollup_state WHERE id = 1"))[0]
    return row[0], row[1]


def rollup_lag(log: LogOrder) -> Procedure[int]:
    """Events written but not yet in the rollups."""
    position = yield from rollup_position()
    rows = yield Query(f"SELECT COUNT(*) FROM events WHERE {log.after}", log.after_params(position))
    return rows[0][0]


def rollups_at(scope: str, size: str, bucket_ms: int) -> Procedure[dict[str, RollupRow]]:
    rows = yield Query("SELECT key, bucket_ms, granted, refused, units, devices, instances FROM rollups"
                       " WHERE scope = ? AND size = ? AND bucket_ms = ?", (scope, size, bucket_ms))
    return {r[0]: RollupRow(*r[1:]) for r in rows}


def rollup_series(scope: str, key: str, size: str, start_ms: int, end_ms: int) -> Procedure[list[RollupRow]]:
    rows = yield Query(
        "SELECT bucket_ms, granted, refused, units, devices, instances FROM rollups"
        " WHERE scope = ? AND key = ? AND size = ? AND bucket_ms >= ? AND bucket_ms < ? ORDER BY bucket_ms",
        (scope, key, size, start_ms, end_ms))
    return [RollupRow(*r) for r in rows]


# -- rollups ------------------------------------------------------------------------------------------

ROLLUP_STATE = "SELECT last_tx, last_seq, next_client, monthly_from_ms, conversion FROM rollup_state WHERE id = 1"
UPSERT_COUNTERS = (
    "INSERT INTO rollups (scope, key, size, bucket_ms, granted, refused, units, devices, instances)"
    " VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (scope, key, size, bucket_ms) DO UPDATE SET"
    " granted = rollups.granted + excluded.granted, refused = rollups.refused + excluded.refused,"
    " units = rollups.units + excluded.units, devices = rollups.devices + excluded.devices,"
    " instances = rollups.instances + excluded.instances")


def roll_up(log: LogOrder, quantities: dict[str, tuple[str, int]], limit: int,
            key_ids: dict[Key, int] | None = None) -> Procedure[RollupResult]:
    """Fold the next events of the log into the rollups: the final ones after the rollups' position
    (`key_ids`: the store's cache of rollup_keys)."""
    key_ids = {} if key_ids is None else key_ids
    last_tx, last_seq, next_client, monthly_from, conversion = (yield Query(ROLLUP_STATE))[0]
    if conversion:  # the marks of the release before are still being converted (convert_marks)
        return RollupResult(0, last_seq, {})
    position: Position = (last_tx, last_seq)
    # The horizon first, then the events below it: a transaction still in flight when the horizon is read
    # may commit events numbered below those read (PostgreSQL), which a later pass then folds.
    horizon = yield from log_horizon(log)
    rows = yield Query(f"SELECT tx, seq, at_ms, type, code, item_id, client_uuid, result, units, instances"
                       f" FROM events WHERE {log.after} AND tx < ?"
                       f" AND type IN ('handshake', 'usage.record') ORDER BY {log.order} LIMIT ?",
                       (*log.after_params(position), horizon, limit))
    if len(rows) == limit:
        position = rows[-1][0], rows[-1][1]
        folded_upto = position[1]
    else:  # every final event is read: on past the last one (of any type)
        position = max(position, (yield from log.end(horizon)))
        folded_upto = position[1] if log.sequential else (yield Query(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE tx < ?", (horizon,)))[0][0]
    events = [EventFacts(*r[1:]) for r in rows]
    overuse, next_client = yield from apply_rollup(events, quantities, key_ids, next_client, monthly_from)
    yield Exec("UPDATE rollup_state SET last_tx = ?, last_seq = ?, next_client = ? WHERE id = 1",
               (*position, next_client))
    return RollupResult(len(events), folded_upto, overuse)


def apply_rollup(events: list[EventFacts], quantities: dict[str, tuple[str, int]], key_ids: dict[Key, int],
                 next_client: int, monthly_from: int | None) -> Procedure[tuple[dict[str, int], int]]:
    """Fold `events` into the counters and device marks, and move the items' overuse with them; returns the
    overuse added per item and the next device number (for rollup_state)."""
    acts = activities(events)
    ids = yield from _key_ids({(s, k) for e in events for s, k in (("code", e.code), ("item", e.item_id)) if k},
                              key_ids)
    marks, next_client = yield from _read_marks({a.client_uuid for a in acts}, days_touched(acts), next_client)
    per_device = {i for i, (kind, _) in quantities.items() if kind == LicenseType.PER_CONCURRENT_DEVICE}
    per_instance = {i for i, (kind, _) in quantities.items() if kind == LicenseType.PER_CONCURRENT_INSTANCE}
    folded = fold(events, acts, marks, ids, per_device, per_instance, monthly_from)
    overuse: dict[str, int] = {}
    slots: dict[str, list[int]] = {}
    for item_id, slot in folded.growth:
        slots.setdefault(item_id, []).append(slot)
    for item_id, item_slots in slots.items():
        # Instance- (or device-) slices beyond the quantity are the item's exceptions.
        column = "instances" if item_id in per_instance else "devices"
        before = dict((yield from _select_in(
            f"SELECT bucket_ms, {column} FROM rollups WHERE scope = 'item' AND key = ? AND size = '3m'"
            " AND bucket_ms", item_slots, item_id, kind="bigint")))
        quantity = quantities[item_id][1]
        delta = sum(overuse_delta(before.get(s, 0), before.get(s, 0) + folded.growth[(item_id, s)], quantity)
                    for s in item_slots)
        if delta:
            overuse[item_id] = delta
    yield from _write_counters(folded.counters)
    yield from _write_marks(marks)
    for item_id, delta in overuse.items():
        # The overuse counter moves with the rollup, in its transaction.
        yield Exec(
            "UPDATE items SET overuse_used = overuse_used + ?,"
            " overused = CASE WHEN overuse_used + ? >= ? THEN 1 ELSE overused END WHERE item_id = ?",
            (delta, delta, tolerance(quantities[item_id][1]), item_id),
        )
    return overuse, next_client


def _key_ids(keys: set[Key], cache: dict[Key, int]) -> Procedure[dict[Key, int]]:
    """The numbers of `keys` in rollup_keys, given to the new ones. The cache holds only rows read back (a
    number given in a transaction that is then rolled back is never remembered)."""
    ids = {k: cache[k] for k in keys if k in cache}
    if len(ids) == len(keys):
        return ids
    cache.update({(scope, key): kid for kid, scope, key in (yield Query("SELECT id, scope, key FROM rollup_keys"))})
    ids = {k: cache[k] for k in keys if k in cache}
    new = sorted(keys - ids.keys())
    if new:
        top = max(cache.values(), default=0)
        rows = [(top + n + 1, scope, key) for n, (scope, key) in enumerate(new)]
        yield Many("INSERT INTO rollup_keys (id, scope, key) VALUES (?,?,?)", rows)
        ids.update({(scope, key): kid for kid, scope, key in rows})
    return ids


def _read_marks(clients: set[str], days: set[tuple[str, int]], next_client: int) -> Procedure[tuple[Marks, int]]:
    """The marks of `clients` and their day rows `days`; devices never seen get the next numbers."""
    marks = Marks()
    for client, cid, data in (yield from _select_in(
            "SELECT client_uuid, id, marks FROM rollup_clients WHERE client_uuid", clients)):
        marks.clients[client] = ClientMarks(cid, bytes(data))
    for client in sorted(clients - marks.clients.keys()):
        marks.clients[client] = ClientMarks(next_client)
        marks.changed_clients.add(client)
        next_client += 1
    by_day: dict[int, dict[int, str]] = {}
    for client, day in days:
        by_day.setdefault(day, {})[marks.clients[client].id] = client
    for day, named in sorted(by_day.items()):
        for cid, data in (yield from _select_in("SELECT client, marks FROM rollup_days WHERE day = ? AND client",
                                                list(named), day, kind="bigint")):
            marks.days[(named[cid], day)] = decode_day(bytes(data))
    return marks, next_client


def _write_counters(counters: dict[Bucket, Counters]) -> Procedure[None]:
    rows = [(*k, c.granted, c.refused, c.units, c.devices, c.instances) for k, c in counters.items()
            if c.granted or c.refused or c.units or c.devices or c.instances]
    if rows:
        yield Many(UPSERT_COUNTERS, rows, ("text", "text", "text", "bigint", "bigint", "bigint", "bigint", "bigint",
                                           "bigint"))


def _write_marks(marks: Marks) -> Procedure[None]:
    if marks.changed_clients:
        yield Many("INSERT INTO rollup_clients (client_uuid, id, marks) VALUES (?,?,?)"
                   " ON CONFLICT (client_uuid) DO UPDATE SET marks = excluded.marks",
                   [(c, marks.clients[c].id, encode_client(marks.clients[c].keys)) for c in marks.changed_clients],
                   ("text", "bigint", "bytea"))
    if marks.changed_days:
        yield Many("INSERT INTO rollup_days (day, client, marks) VALUES (?,?,?)"
                   " ON CONFLICT (day, client) DO UPDATE SET marks = excluded.marks",
                   [(day, marks.clients[c].id, encode_day(marks.days[(c, day)])) for c, day in marks.changed_days],
                   ("integer", "bigint", "bytea"))


def rollup_conversion() -> Procedure[int]:
    """0 once the marks of the release before are converted (or there were none), else 1 or 2."""
    return (yield Query(ROLLUP_STATE))[0][4]


OldMark = tuple[str, str, str, int, str]  # rollup_devices' key: scope, key, size, bucket_ms, client_uuid


def convert_marks(now_ms: int, limit: int, key_ids: dict[Key, int],
                  after: OldMark | None) -> Procedure[tuple[int, OldMark | None]]:
    """One step of converting the device marks of the release before (rollup_devices, one row per device,
    bucket and scope) into the day rows: returns (old rows taken, the last one's key); (0, None) once none is
    left. Each step is a transaction of its own that writes the new rows and deletes the old ones it read, so
    an interrupted conversion goes on where it stopped. `after`: the last key the step before took, if any
    (where to start reading; the rows before it are deleted anyway)."""
    _, _, next_client, monthly_from, conversion = (yield Query(ROLLUP_STATE))[0]
    if conversion == 0:
        return 0, None
    if conversion == 1:
        yield from _seed_months(now_ms, key_ids)
        return 1, None
    if after is None:
        rows = yield Query("SELECT scope, key, size, bucket_ms, client_uuid, instances FROM rollup_devices"
                           " ORDER BY scope, key, size, bucket_ms, client_uuid LIMIT ?", (limit,))
    else:
        rows = yield Query("SELECT scope, key, size, bucket_ms, client_uuid, instances FROM rollup_devices"
                           " WHERE (scope, key, size, bucket_ms, client_uuid) > (?, ?, ?, ?, ?)"
                           " ORDER BY scope, key, size, bucket_ms, client_uuid LIMIT ?", (*after, limit))
    if not rows:
        if after is not None:  # rows before the cursor (another node's), if any: from the start once more
            return (yield from convert_marks(now_ms, limit, key_ids, None))
        yield Exec("UPDATE rollup_state SET conversion = 0 WHERE id = 1")
        return 0, None
    # All-time marks, and 3-minute ones of buckets a record can still reach; the others are implied or
    # past any record (core/usage.py convert_mark) and are dropped.
    horizon = now_ms - MARKS_DAYS * DAY_MS
    live = [r for r in rows if r[2] == "all" or (r[2] == "3m" and r[3] + SLICE_MS > horizon)]
    ids = yield from _key_ids({(r[0], r[1]) for r in live}, key_ids)
    marks, next_client = yield from _read_marks(
        {r[4] for r in live}, {(r[4], r[3] // DAY_MS) for r in live if r[2] != "all"}, next_client)
    counters: dict[Bucket, Counters] = {}
    for scope, key, size, bucket, client, instances in live:
        convert_mark(marks, ids[(scope, key)], (scope, key), size, bucket, client, instances or 0, monthly_from,
                     counters)
    yield from _write_counters(counters)
    yield from _write_marks(marks)
    yield Many("DELETE FROM rollup_devices WHERE scope = ? AND key = ? AND size = ? AND bucket_ms = ?"
               " AND client_uuid = ?", [tuple(r[:5]) for r in rows])
    yield Exec("UPDATE rollup_state SET next_client = ? WHERE id = 1", (next_client,))
    return len(rows), tuple(rows[-1][:5])  # type: ignore[return-value]


def _seed_months(now_ms: int, key_ids: dict[Key, int]) -> Procedure[None]:
    """The conversion's first step: number every code and item of the rollups, give each the monthly
    counters summed from its daily ones, and count devices per month where the marks of the release before
    cover whole months: from the first month that began within the 31 days they were kept."""
    keys: list[Key] = []
    while True:  # one index step per key (a scan of the rollups would hold the database for long)
        rows = (yield Query("SELECT scope, key FROM rollups WHERE (scope, key) > (?, ?) ORDER BY scope, key LIMIT 1",
                            keys[-1] if keys else ("", "")))
        if not rows:
            break
        keys.append((rows[0][0], rows[0][1]))
    yield from _key_ids(set(keys), key_ids)
    months: dict[Bucket, Counters] = {}
    for scope, key in keys:
        for bucket, granted, refused, units in (yield Query(
                "SELECT bucket_ms, granted, refused, units FROM rollups WHERE scope = ? AND key = ? AND size = '1d'",
                (scope, key))):
            c = months.setdefault((scope, key, MONTH, bucket_start(bucket, MONTH)), Counters())
            c.granted += granted
            c.refused += refused
            c.units += units
    yield from _write_counters(months)
    first = month_index(now_ms - MARKS_DAYS * DAY_MS)
    monthly_from = month_start_ms(first if month_start_ms(first) >= now_ms - MARKS_DAYS * DAY_MS else first + 1)
    yield Exec("UPDATE rollup_state SET conversion = 2, monthly_from_ms = ? WHERE id = 1", (monthly_from,))


def prune_marks(before_day: int, limit: int) -> Procedure[int]:
    """Delete up to `limit` day rows of days before `before_day` (no record can reach them any more)."""
    return (yield Exec("DELETE FROM rollup_days WHERE (day, client) IN (SELECT day, client FROM rollup_days"
                       " WHERE day < ? ORDER BY day, client LIMIT ?)", (before_day, limit)))


def prune_counters(horizons: dict[str, int], limit: int) -> Procedure[int]:
    """Delete counters of the sizes in `horizons` in buckets starting before each one's horizon, up to about
    `limit` rows (one index range per code or item and size)."""
    total = 0
    for scope, key in (yield Query("SELECT scope, key FROM rollup_keys ORDER BY id")):
        for size, before in horizons.items():
            total += yield Exec(
                "DELETE FROM rollups WHERE scope = ? AND key = ? AND size = ? AND bucket_ms IN (SELECT bucket_ms"
                " FROM rollups WHERE scope = ? AND key = ? AND size = ? AND bucket_ms < ? ORDER BY bucket_ms LIMIT ?)",
                (scope, key, size, scope, key, size, before, limit))
            if total >= limit:
                return total
    return total


# -- archiving the event log ----------------------------------------------------------------------

# What an archive run may move out of the log: the events written per device contact, the log's bulk.
# The others (imports, code and item changes, overuse) are few and stay: they are the audit trail, and
# a deleted code is known to have existed from its code.created event.
ARCHIVED_TYPES = ("handshake", "seat.granted", "seat.refreshed", "seat.released", "usage.record", "usage.report")
_ARCHIVED = "type IN (" + ",".join(f"'{t}'" for t in ARCHIVED_TYPES) + ")"
ARCHIVE_COLUMNS = "id, path, first_seq, last_seq, before_ms, events, bytes, created_ms, done_ms, folded_tx, folded_seq"


@dataclass(frozen=True)
class ArchiveRow:
    """One archive file: it holds every event of an archived type with first_seq <= seq <= last_seq,
    at_ms < before_ms and (tx, seq) <= (folded_tx, folded_seq). Written once the file is durable; done_ms
    once those events left the log."""

    id: int
    path: str
    first_seq: int
    last_seq: int
    before_ms: int
    events: int
    bytes: int
    created_ms: int
    done_ms: int | None
    folded_tx: int = 2**63 - 1
    folded_seq: int = 2**63 - 1


@dataclass(frozen=True)
class ArchiveHorizon:
    """What an archive run may take: events numbered up to `upto`, at or before the rollups' position
    `folded` (final there, and folded into the statistics)."""

    upto: int
    folded: Position


def archive_horizon(before_ms: int) -> Procedure[ArchiveHorizon]:
    """The highest event number an archive run before `before_ms` may take, and the rollups' position.

    Only events the rollups have folded (statistics stay exact), never the newest event (SQLite gives a
    new event the largest number plus one: deleting the newest would hand its number out again, below
    the rollups' mark), and no further than the newest event stamped before the horizon (reading on
    would scan the recent log; a late usage record past it waits for a later run).
    """
    folded = yield from rollup_position()
    newest = (yield Query("SELECT COALESCE(MAX(seq), 0) FROM events"))[0][0]
    # The highest number of that millisecond: a batch stamps its events with one time, and PostgreSQL keeps equal
    # times in the rows' order in the table, not in number order.
    rows = yield Query("SELECT seq FROM events WHERE at_ms < ? ORDER BY at_ms DESC, seq DESC LIMIT 1", (before_ms,))
    # Once usage statements are exported, the next one starts at the last one's heads: events after them
    # stay in the log until a statement has covered them.
    stated = yield from statement_horizon()
    upto = min(newest - 1, rows[0][0] if rows else 0, stated)
    # One writer (tx 0): the rollups have folded every event up to their number. Parallel writers: the
    # (tx, seq) bound of every page and delete keeps to what they folded.
    return ArchiveHorizon(min(upto, folded[1]) if folded[0] == 0 else upto, folded)


def statement_horizon() -> Procedure[int]:
    """The highest event number below which every chained event is covered by the last usage statement
    (no statement yet: no bound). Each chain's first uncovered event is found by its (chain, chain_seq) index."""
    rows = yield Query("SELECT heads FROM usage_statements ORDER BY id DESC LIMIT 1")
    if not rows:
        return 2**62
    covered: dict[str, list[Any]] = json.loads(rows[0][0])
    bound = 2**62
    for (chain,) in (yield Query("SELECT chain FROM usage_chains")):
        upto = covered.get(str(chain), [0])[0]
        after = yield Query("SELECT seq FROM events WHERE chain = ? AND chain_seq > ? ORDER BY chain_seq LIMIT 1",
                            (chain, upto))
        if after:
            bound = min(bound, after[0][0] - 1)
    return bound


def archivable_page(after: int, horizon: ArchiveHorizon, before_ms: int, limit: int) -> Procedure[list[StoredEvent]]:
    rows = yield Query(f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? AND seq <= ? AND at_ms < ?"
                       f" AND {_ARCHIVED} AND (tx < ? OR (tx = ? AND seq <= ?)) ORDER BY seq LIMIT ?",
                       (after, horizon.upto, before_ms, horizon.folded[0], *horizon.folded, limit))
    return [stored_event(r) for r in rows]


def record_archive(path: str, first_seq: int, last_seq: int, before_ms: int, events: int, size: int,
                   created_ms: int, horizon: ArchiveHorizon) -> Procedure[ArchiveRow]:
    next_id = (yield Query("SELECT COALESCE(MAX(id), 0) + 1 FROM event_archives"))[0][0]
    row = ArchiveRow(next_id, path, first_seq, last_seq, before_ms, events, size, created_ms, None, *horizon.folded)
    yield Exec(f"INSERT INTO event_archives ({ARCHIVE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
               (row.id, row.path, row.first_seq, row.last_seq, row.before_ms, row.events, row.bytes,
                row.created_ms, row.done_ms, row.folded_tx, row.folded_seq))
    return row


def delete_archived(row: ArchiveRow, limit: int) -> Procedure[int]:
    """Delete up to `limit` of the archive's events still in the log; 0 when none is left."""
    return (yield Exec(
        f"DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE seq >= ? AND seq <= ? AND at_ms < ?"
        f" AND {_ARCHIVED} AND (tx < ? OR (tx = ? AND seq <= ?)) ORDER BY seq LIMIT ?)",
        (row.first_seq, row.last_seq, row.before_ms, row.folded_tx, row.folded_tx, row.folded_seq, limit)))


def finish_archive(archive_id: int, done_ms: int) -> Procedure[None]:
    yield Exec("UPDATE event_archives SET done_ms = ? WHERE id = ?", (done_ms, archive_id))


def event_archives() -> Procedure[list[ArchiveRow]]:
    return [ArchiveRow(*r) for r in (yield Query(f"SELECT {ARCHIVE_COLUMNS} FROM event_archives ORDER BY id"))]


# -- the admin account ------------------------------------------------------------------------------


def admin_password_hash() -> Procedure[str | None]:
    rows = yield Query("SELECT password_hash FROM admin WHERE id = 1")
    return rows[0][0] if rows else None


def set_admin_password(password_hash: str, at_ms: int, only_if_unset: bool) -> Procedure[bool]:
    """Set the password and end every session; with only_if_unset, False when one was already set."""
    if only_if_unset and (yield Query("SELECT 1 FROM admin WHERE id = 1")):
        return False
    yield Exec("INSERT INTO admin (id, password_hash, changed_ms) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE"
               " SET password_hash = excluded.password_hash, changed_ms = excluded.changed_ms", (password_hash, at_ms))
    yield Exec("DELETE FROM admin_tokens")
    return True


def add_admin_token(token_hash: str, at_ms: int, expires_ms: int) -> Procedure[None]:
    yield Exec("DELETE FROM admin_tokens WHERE expires_ms <= ?", (at_ms,))
    yield Exec("INSERT INTO admin_tokens (token_hash, created_ms, expires_ms) VALUES (?,?,?)",
               (token_hash, at_ms, expires_ms))


def admin_token_expiry(token_hash: str) -> Procedure[int | None]:
    rows = yield Query("SELECT expires_ms FROM admin_tokens WHERE token_hash = ?", (token_hash,))
    return rows[0][0] if rows else None


def delete_admin_token(token_hash: str) -> Procedure[None]:
    yield Exec("DELETE FROM admin_tokens WHERE token_hash = ?", (token_hash,))


def _nothing_rolled_up() -> RollupResult:
    """What a rollup call that did not run returns (another node held the lock): nothing read."""
    return RollupResult(0, 0, {})


def _none_pruned() -> int:
    return 0


class Operations:
    """The store operations that are one procedure in one transaction, mixed into both stores.

    Each store supplies `_call(procedure, lock, busy)`; the lock keys name what
    must take turns across the nodes of a PostgreSQL cluster (SQLite has one
    writer and leaves them None). With `busy`, a call does not wait for a lock
    another node holds: it returns busy() without running the procedure.
    """

    ROLLUP_LOCK: int | None = None
    ADMIN_LOCK: int | None = None
    LOG: LogOrder = SEQUENTIAL

    async def _call(self, proc: Procedure[T], lock: int | None = None, busy: Callable[[], T] | None = None) -> T:
        raise NotImplementedError

    async def _rollup_turn(self, proc: Procedure[T], wait: bool, nothing: Callable[[], T]) -> T:
        """`proc` under the rollup lock: waiting for it, or (wait=False) nothing() while another node holds it."""
        return await self._call(proc, self.ROLLUP_LOCK, None if wait else nothing)

    async def load(self, per_slice_types: tuple[str, ...] = (), now_ms: int = 0) -> Snapshot:
        return await self._call(load_snapshot(per_slice_types, now_ms))

    async def load_catalog(self) -> Snapshot:
        return await self._call(load_catalog())

    async def reload(self, items: set[str], clients: set[str]) -> Reloaded:
        return await self._call(reload(items, clients))

    async def device_rows(self, clients: set[str]) -> tuple[list[Seat], list[AuthorizationRecord], dict[str, str]]:
        return await self._call(device_rows(clients))

    async def lapsed_seats(self, now_ms: int, limit: int) -> list[Seat]:
        return await self._call(lapsed_seats(now_ms, limit))

    async def item_seats(self, item_id: str, limit: int, offset: int = 0) -> list[Seat]:
        return await self._call(item_seats(item_id, limit, offset))

    async def item_holders(self, item_id: str, seats: bool, now_ms: int, limit: int, offset: int = 0
                           ) -> tuple[int, list[Holder]]:
        return await self._call(item_holders(item_id, seats, now_ms, limit, offset))

    async def borrowed_count(self, item_id: str, now_ms: int) -> int:
        return await self._call(sql_offline.borrowed_count(item_id, now_ms))

    async def code_seats(self, items: set[str]) -> dict[tuple[str, str], int]:
        return await self._call(sql_offline.code_seat_counts(items))

    async def count_borrowed_slices(self, now_ms: int, quantities: dict[str, tuple[str, int]], wait: bool = True
                                    ) -> RollupResult:
        """Mark borrowed devices active in the slices their borrows covered so far; one node at a time (see
        roll_up for `wait`)."""
        return await self._rollup_turn(sql_offline.count_borrowed_slices(now_ms, quantities, self._rollup_keys),
                                       wait, _nothing_rolled_up)

    async def events(self, query: EventQuery) -> AsyncIterator[StoredEvent]:
        """Stream events in order, a page at a time, so memory stays flat: the events final when the
        stream starts (see LogOrder)."""
        after = 0
        below = await self._call(log_horizon(self.LOG))
        while page := await self._call(events_page(query, after, below)):
            for event in page:
                yield event
            after = page[-1].seq

    async def report_seen(self, report_id: str) -> bool:
        return await self._call(report_seen(report_id))

    async def rollup_lag(self) -> int:
        return await self._call(rollup_lag(self.LOG))

    # Codes' and items' numbers in rollup_keys as read so far (they never change once given); where the
    # conversion of the release before's marks read up to.
    _rollup_key_cache: dict[Key, int] | None = None
    _conversion_cursor: OldMark | None = None

    @property
    def _rollup_keys(self) -> dict[Key, int]:
        if self._rollup_key_cache is None:
            self._rollup_key_cache = {}
        return self._rollup_key_cache

    async def roll_up(self, quantities: dict[str, tuple[str, int]], limit: int = 50_000, wait: bool = True
                      ) -> RollupResult:
        """Fold the next events of the log into the rollups; one node at a time. Folds nothing while the
        marks of the release before are being converted (convert_marks). With wait=False it also folds
        nothing while another node holds the rollup lock, instead of waiting its turn."""
        return await self._rollup_turn(roll_up(self.LOG, quantities, limit, self._rollup_keys), wait,
                                       _nothing_rolled_up)

    async def rollup_conversion(self) -> int:
        return await self._call(rollup_conversion())

    async def convert_marks(self, now_ms: int, limit: int = 2000) -> int:
        """One step of converting the release before's device marks; 0 once none is left."""
        done, self._conversion_cursor = await self._call(
            convert_marks(now_ms, limit, self._rollup_keys, self._conversion_cursor), self.ROLLUP_LOCK)
        return done

    async def prune_marks(self, before_day: int, limit: int = 5000, wait: bool = True) -> int:
        return await self._rollup_turn(prune_marks(before_day, limit), wait, _none_pruned)

    async def prune_counters(self, horizons: dict[str, int], limit: int = 5000, wait: bool = True) -> int:
        return await self._rollup_turn(prune_counters(horizons, limit), wait, _none_pruned)

    async def rollups_at(self, scope: str, size: str, bucket_ms: int) -> dict[str, RollupRow]:
        return await self._call(rollups_at(scope, size, bucket_ms))

    async def rollup_series(self, scope: str, key: str, size: str, start_ms: int, end_ms: int) -> list[RollupRow]:
        return await self._call(rollup_series(scope, key, size, start_ms, end_ms))

    async def archive_horizon(self, before_ms: int) -> ArchiveHorizon:
        return await self._call(archive_horizon(before_ms))

    async def archivable_page(self, after: int, horizon: ArchiveHorizon, before_ms: int,
                              limit: int) -> list[StoredEvent]:
        return await self._call(archivable_page(after, horizon, before_ms, limit))

    async def record_archive(self, path: str, first_seq: int, last_seq: int, before_ms: int, events: int,
                             size: int, created_ms: int, horizon: ArchiveHorizon) -> ArchiveRow:
        return await self._call(record_archive(path, first_seq, last_seq, before_ms, events, size, created_ms,
                                               horizon))

    async def delete_archived(self, row: ArchiveRow, limit: int) -> int:
        return await self._call(delete_archived(row, limit))

    async def finish_archive(self, archive_id: int, done_ms: int) -> None:
        await self._call(finish_archive(archive_id, done_ms))

    async def event_archives(self) -> list[ArchiveRow]:
        return await self._call(event_archives())

    async def admin_password_hash(self) -> str | None:
        return await self._call(admin_password_hash())

    async def set_admin_password(self, password_hash: str, at_ms: int, only_if_unset: bool = False) -> bool:
        return await self._call(set_admin_password(password_hash, at_ms, only_if_unset), self.ADMIN_LOCK)

    async def add_admin_token(self, token_hash: str, at_ms: int, expires_ms: int) -> None:
        await self._call(add_admin_token(token_hash, at_ms, expires_ms))

    async def admin_token_expiry(self, token_hash: str) -> int | None:
        return await self._call(admin_token_expiry(token_hash))

    async def delete_admin_token(self, token_hash: str) -> None:
        await self._call(delete_admin_token(token_hash))
