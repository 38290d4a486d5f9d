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
from collections.abc import AsyncIterator, Generator
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
from lts_server.core.times import from_ms, iso, parse_iso, to_ms, utcnow
from lts_server.core.usage import (
    BUCKETS,
    EventFacts,
    aggregate,
    overuse_delta,
    tolerance,
)
from lts_server.store import sql_offline
from lts_server.store import (
    AuthorizationRecord,
    Conflict,
    Event,
    EventQuery,
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
    sql: str
    rows: list[tuple[Any, ...]]


Statement = Query | Exec | Many
Procedure = Generator[Statement, Any, T]

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
STATUS_COLUMNS = "revoked, seats_used, units_used, overuse_used, overused"


def load_snapshot(per_slice_types: tuple[str, ...], now_ms: int) -> Procedure[Snapshot]:
    """The catalog and the live authorizations of items counted per time slice; no other device rows
    (those are read per device when it asks: lts_server/devices.py)."""
    snap = yield from load_catalog()
    per_slice = [i.item_id for i in snap.items.values() if i.license_type.value in per_slice_types]
    if per_slice:  # no index leads there: a scan of the authorizations, only when such items exist
        for row in (yield from _select_in(
                f"SELECT {AUTHORIZATION_COLUMNS} FROM authorizations WHERE expires_ms > ? AND item_id", per_slice,
                now_ms)):
            auth = _authorization(row)
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
        " issued_at, key_id, sha256, file_text, first_imported_ms, updated_ms FROM licenses"
    )):
        lic = License(
            license_id=row[0], alias=row[1], organization_id=row[2], license_text_version=row[3], status=row[4],
            revision=row[5], server_uuid=row[6], issued_at=parse_iso(row[7]),
            items=tuple(items_by_license.get(row[0], ())),
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


def device_rows(clients: set[str]) -> Procedure[tuple[list[Seat], list[AuthorizationRecord]]]:
    """Every seat and authorization of `clients`."""
    seats = [_seat(r) for r in (yield from _select_in(f"SELECT {SEAT_COLUMNS} FROM seats WHERE client_uuid", clients))]
    auths = [_authorization(r) for r in (yield from _select_in(
        f"SELECT {AUTHORIZATION_COLUMNS} FROM authorizations WHERE client_uuid", clients))]
    return seats, auths


def reload(items: set[str], clients: set[str]) -> Procedure[Reloaded]:
    """What other nodes may have changed: the counters of `items` (and of the items the devices sit on),
    every seat and authorization of `clients`."""
    seats, auths = yield from device_rows(clients)
    touched = items | {s.item_id for s in seats}
    rows = yield from _select_in(f"SELECT item_id, {STATUS_COLUMNS} FROM items WHERE item_id", touched)
    return Reloaded({r[0]: _status(r[1:]) for r in rows}, seats, auths,
                    (yield from sql_offline.code_seat_counts(touched)))


def lapsed_seats(now_ms: int, limit: int) -> Procedure[list[Seat]]:
    """Seats whose active period ended by `now_ms`, the oldest first (index seats_expiry)."""
    return [_seat(r) for r in (yield Query(
        f"SELECT {SEAT_COLUMNS} FROM seats WHERE expires_ms <= ? ORDER BY expires_ms LIMIT ?", (now_ms, limit)))]


def item_seats(item_id: str, limit: int, offset: int) -> Procedure[list[Seat]]:
    """An item's seats in the order they were granted, a page at a time."""
    return [_seat(r) for r in (yield Query(
        f"SELECT {SEAT_COLUMNS} FROM seats WHERE item_id = ? ORDER BY granted_ms, client_uuid LIMIT ? OFFSET ?",
        (item_id, limit, offset)))]


def _select_in(select: str, values: set[str] | list[str], *before: Any) -> Procedure[list[tuple[Any, ...]]]:
    """`select` ending in a column, with IN (values), in chunks."""
    ordered = sorted(values)
    rows: list[tuple[Any, ...]] = []
    for i in range(0, len(ordered), IN_CHUNK):
        chunk = ordered[i:i + IN_CHUNK]
        rows += yield Query(f"{select} IN ({','.join('?' * len(chunk))})", (*before, *chunk))
    return rows


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


def _seat(row: tuple[Any, ...]) -> Seat:
    return Seat(row[0], row[1], from_ms(row[2]), from_ms(row[3]), from_ms(row[4]), row[5],
                from_ms(row[6]) if row[6] is not None else None)


def _authorization(row: tuple[Any, ...]) -> AuthorizationRecord:
    return AuthorizationRecord(row[0], row[1], row[2], row[3], from_ms(row[4]), from_ms(row[5]))


# -- writing ----------------------------------------------------------------------------------------


def write_batch(b: WriteBatch) -> Procedure[None]:
    """Every change of the batch, in one transaction (the caller's)."""
    if b.licenses:
        yield Many(
            "INSERT INTO licenses (license_id, alias, organization_id, license_text_version, status,"
            " revision, server_uuid, issued_at, key_id, sha256, file_text, first_imported_ms, updated_ms)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (license_id) DO UPDATE SET alias = excluded.alias,"
            " organization_id = excluded.organization_id,"
            " license_text_version = excluded.license_text_version, status = excluded.status,"
            " revision = excluded.revision, server_uuid = excluded.server_uuid,"
            " issued_at = excluded.issued_at, key_id = excluded.key_id, sha256 = excluded.sha256,"
            " file_text = excluded.file_text, updated_ms = excluded.updated_ms",
            [(r.license.license_id, r.license.alias, r.license.organization_id, r.license.license_text_version,
              r.license.status, r.license.revision, r.license.server_uuid, iso(r.license.issued_at), r.key_id,
              r.sha256, r.file_text, to_ms(r.first_imported_at), to_ms(r.updated_at)) for r in b.licenses],
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
        yield from _seat_change(change)
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
    if b.events:
        yield Many(
            "INSERT INTO events (at_ms, type, code, item_id, client_uuid, product, deployment_type, result,"
            " detail, units, instances) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [(to_ms(e.at), e.type, e.code, e.item_id, e.client_uuid, e.product, e.deployment_type, e.result,
              _compact_json(e.detail) if e.detail else None, e.units, e.instances)
             for e in b.events],
        )


def _seat_change(change: SeatChange) -> Procedure[None]:
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
        else:  # other codes' unused reserved seats stay free
            room = yield Exec("UPDATE items SET seats_used = seats_used + 1"
                              " WHERE item_id = ? AND seats_used + seats_reserved_unused < ?", (s.item_id, change.limit))
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


def events_page(query: EventQuery, after: int) -> Procedure[list[StoredEvent]]:
    where: list[str] = ["seq > ?"]
    params: list[Any] = [after]
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


def rollup_lag() -> Procedure[int]:
    """Events written but not yet in the rollups."""
    rows = yield Query("SELECT COALESCE(MAX(seq), 0) - (SELECT last_seq FROM rollup_state WHERE id = 1) FROM events")
    return max(0, rows[0][0])


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


# -- archiving the event log ----------------------------------------------------------------------

# What an archive run may move out of the log: the events written per device contact, the log's bulk.
# The others (imports, code and item changes, overuse) are few and stay: they are the audit trail, and
# a deleted code is known to have existed from its code.created event.
ARCHIVED_TYPES = ("handshake", "seat.granted", "seat.refreshed", "seat.released", "usage.record", "usage.report")
_ARCHIVED = "type IN (" + ",".join(f"'{t}'" for t in ARCHIVED_TYPES) + ")"
ARCHIVE_COLUMNS = "id, path, first_seq, last_seq, before_ms, events, bytes, created_ms, done_ms"


@dataclass(frozen=True)
class ArchiveRow:
    """One archive file: it holds every event of an archived type with first_seq <= seq <= last_seq and
    at_ms < before_ms. Written once the file is durable; done_ms once those events left the log."""

    id: int
    path: str
    first_seq: int
    last_seq: int
    before_ms: int
    events: int
    bytes: int
    created_ms: int
    done_ms: int | None


def archive_horizon(before_ms: int) -> Procedure[int]:
    """The highest event number an archive run before `before_ms` may take.

    Only events the rollups have folded (statistics stay exact), never the newest event (SQLite gives a
    new event the largest number plus one: deleting the newest would hand its number out again, below
    the rollups' mark), and no further than the newest event stamped before the horizon (reading on
    would scan the recent log; a late usage record past it waits for a later run).
    """
    folded = (yield Query("SELECT last_seq FROM rollup_state WHERE id = 1"))[0][0]
    newest = (yield Query("SELECT COALESCE(MAX(seq), 0) FROM events"))[0][0]
    rows = yield Query("SELECT seq FROM events WHERE at_ms < ? ORDER BY at_ms DESC LIMIT 1", (before_ms,))
    return min(folded, newest - 1, rows[0][0] if rows else 0)


def archivable_page(after: int, upto: int, before_ms: int, limit: int) -> Procedure[list[StoredEvent]]:
    rows = yield Query(f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? AND seq <= ? AND at_ms < ?"
                       f" AND {_ARCHIVED} ORDER BY seq LIMIT ?", (after, upto, before_ms, limit))
    return [stored_event(r) for r in rows]


def record_archive(path: str, first_seq: int, last_seq: int, before_ms: int, events: int, size: int,
                   created_ms: int) -> Procedure[ArchiveRow]:
    next_id = (yield Query("SELECT COALESCE(MAX(id), 0) + 1 FROM event_archives"))[0][0]
    row = ArchiveRow(next_id, path, first_seq, last_seq, before_ms, events, size, created_ms, None)
    yield Exec(f"INSERT INTO event_archives ({ARCHIVE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
               (row.id, row.path, row.first_seq, row.last_seq, row.before_ms, row.events, row.bytes,
                row.created_ms, row.done_ms))
    return row


def delete_archived(row: ArchiveRow, limit: int) -> Procedure[int]:
    """Delete up to `limit` of the archive's events still in the log; 0 when none is left."""
    return (yield Exec(
        f"DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE seq >= ? AND seq <= ? AND at_ms < ?"
        f" AND {_ARCHIVED} ORDER BY seq LIMIT ?)", (row.first_seq, row.last_seq, row.before_ms, limit)))


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


class Operations:
    """The store operations that are one procedure in one transaction, mixed into both stores.

    Each store supplies `_call(procedure, lock)`; the lock keys name what must
    take turns across the nodes of a PostgreSQL cluster (SQLite has one writer
    and leaves them None).
    """

    ROLLUP_LOCK: int | None = None
    WRITE_LOCK: int | None = None

    async def _call(self, proc: Procedure[T], lock: int | None = None) -> T:
        raise NotImplementedError

    async def load(self, per_slice_types: tuple[str, ...] = (), now_ms: int = 0) -> Snapshot:
        return await self._call(load_snapshot(per_slice_types, now_ms))

    async def load_catalog(self) -> Snapshot:
        return await self._call(load_catalog())

    async def reload(self, items: set[str], clients: set[str]) -> Reloaded:
        return await self._call(reload(items, clients))

    async def device_rows(self, clients: set[str]) -> tuple[list[Seat], list[AuthorizationRecord]]:
        return await self._call(device_rows(clients))

    async def lapsed_seats(self, now_ms: int, limit: int) -> list[Seat]:
        return await self._call(lapsed_seats(now_ms, limit))

    async def item_seats(self, item_id: str, limit: int, offset: int = 0) -> list[Seat]:
        return await self._call(item_seats(item_id, limit, offset))

    async def borrowed_count(self, item_id: str, now_ms: int) -> int:
        return await self._call(sql_offline.borrowed_count(item_id, now_ms))

    async def code_seats(self, items: set[str]) -> dict[tuple[str, str], int]:
        return await self._call(sql_offline.code_seat_counts(items))

    async def count_borrowed_slices(self, now_ms: int, quantities: dict[str, tuple[str, int]]) -> RollupResult:
        """Mark borrowed devices active in the slices their borrows covered so far; one node at a time."""
        return await self._call(sql_offline.count_borrowed_slices(now_ms, quantities), self.ROLLUP_LOCK)

    async def events(self, query: EventQuery) -> AsyncIterator[StoredEvent]:
        """Stream events in order, a page at a time, so memory stays flat."""
        after = 0
        while page := await self._call(events_page(query, after)):
            for event in page:
                yield event
            after = page[-1].seq

    async def report_seen(self, report_id: str) -> bool:
        return await self._call(report_seen(report_id))

    async def rollup_lag(self) -> int:
        return await self._call(rollup_lag())

    async def roll_up(self, quantities: dict[str, tuple[str, int]], limit: int = 50_000) -> RollupResult:
        """Fold the next events of the log into the rollups; one node at a time."""
        return await self._call(roll_up(quantities, limit), self.ROLLUP_LOCK)

    async def rollups_at(self, scope: str, size: str, bucket_ms: int) -> dict[str, RollupRow]:
        return await self._call(rollups_at(scope, size, bucket_ms))

    async def rollup_series(self, scope: str, key: str, size: str, start_ms: int, end_ms: int) -> list[RollupRow]:
        return await self._call(rollup_series(scope, key, size, start_ms, end_ms))

    async def prune_rollup_marks(self, before_ms: int) -> int:
        return await self._call(prune_rollup_marks(before_ms), self.ROLLUP_LOCK)

    async def archive_horizon(self, before_ms: int) -> int:
        return await self._call(archive_horizon(before_ms))

    async def archivable_page(self, after: int, upto: int, before_ms: int, limit: int) -> list[StoredEvent]:
        return await self._call(archivable_page(after, upto, before_ms, limit))

    async def record_archive(self, path: str, first_seq: int, last_seq: int, before_ms: int, events: int,
                             size: int, created_ms: int) -> ArchiveRow:
        return await self._call(record_archive(path, first_seq, last_seq, before_ms, events, size, created_ms))

    async def delete_archived(self, row: ArchiveRow, limit: int) -> int:
        return await self._call(delete_archived(row, limit))

    async def finish_archive(self, archive_id: int, done_ms: int) -> None:
        await self._call(finish_archive(archive_id, done_ms))

    async def event_archives(self) -> list[ArchiveRow]:
        return await self._call(event_archives())

    async def admin_password_hash(self) -> str | None:
        return await self._call(admin_password_hash())

    async def set_admin_password(self, password_hash: str, at_ms: int, only_if_unset: bool = False) -> bool:
        return await self._call(set_admin_password(password_hash, at_ms, only_if_unset), self.WRITE_LOCK)

    async def add_admin_token(self, token_hash: str, at_ms: int, expires_ms: int) -> None:
        await self._call(add_admin_token(token_hash, at_ms, expires_ms))

    async def admin_token_expiry(self, token_hash: str) -> int | None:
        return await self._call(admin_token_expiry(token_hash))

    async def delete_admin_token(self, token_hash: str) -> None:
        await self._call(delete_admin_token(token_hash))
