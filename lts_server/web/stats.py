"""Statistics per handshake code and per item (from the rollups), the event export and its archives."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

from aiohttp import web

from lts_server.archive import EVENT_FIELDS, archive_line, event_values
from lts_server.core.model import Counts, hard_limit
from lts_server.core.reservations import over_quantity
from lts_server.core.state import SEVERITY, ItemState, item_state
from lts_server.core.times import from_ms, iso, parse_iso, to_ms
from lts_server.core.usage import DAY_MS, MONTH, SERIES, bucket_count, bucket_start, next_bucket, tolerance
from lts_server.store import EventQuery, RollupRow
from lts_server.store.sql import ArchiveRow
from lts_server.web.device import read_json_body
from lts_server.web.errors import ApiError, decode_json
from lts_server.web.schemas import ArchiveBody
from lts_server.web.services import SERVICES, Services

MAX_BUCKETS = 10_000
# Query dates are kept well inside what datetime can represent, so a default span or a day added
# to them never overflows.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
DEFAULT_SPAN = {"3m": timedelta(days=1), "2h": timedelta(days=7), "1d": timedelta(days=30),
                MONTH: timedelta(days=365)}
# Other nodes of a cluster read the log every follow_ms: an archive leaves them an hour at the least.
ARCHIVE_MIN_AGE = timedelta(hours=1)


def query_time(name: str, value: str) -> datetime:
    """A date-time from a query parameter, within the years the statistics can do arithmetic with."""
    try:
        t = parse_iso(value)
    except ValueError as e:
        problem = "is out of range" if "out of range" in str(e) else "is not an ISO 8601 date-time with a time zone"
        raise ApiError(400, f"{name}: {value!r} {problem}; give one between {iso(EARLIEST)} and {iso(LATEST)}",
                       name) from None
    if not EARLIEST <= t <= LATEST:
        raise ApiError(400, f"{name}: {value!r} is out of range; give one between {iso(EARLIEST)} and {iso(LATEST)}",
                       name)
    return t


def _time(request: web.Request, name: str) -> datetime | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    return query_time(name, value)


def check_span(bucket: str, start: datetime, end: datetime) -> None:
    """Refuse a range of more than MAX_BUCKETS buckets: the answer holds one entry per bucket."""
    if bucket_count(to_ms(start), to_ms(end), bucket) > MAX_BUCKETS:
        raise ApiError(400, f"bucket: more than {MAX_BUCKETS} {bucket} buckets; choose a wider bucket or a shorter range",
                       "bucket")


def _range(request: web.Request, services: Services) -> tuple[str, datetime, datetime]:
    bucket = request.query.get("bucket", "2h")
    if bucket not in SERIES:
        raise ApiError(400, f"bucket: expected one of {', '.join(SERIES)}, got {bucket!r}", "bucket")
    end = _time(request, "to") or services.ledger.clock()
    start = _time(request, "from") or end - DEFAULT_SPAN[bucket]
    if start >= end:
        raise ApiError(400, "from: must be before to", "from")
    check_span(bucket, start, end)
    return bucket, start, end


def _row(row: RollupRow | None) -> dict[str, int]:
    if row is None:
        return {"granted": 0, "refused": 0, "units": 0, "devices": 0}
    return {"granted": row.granted, "refused": row.refused, "units": row.units, "devices": row.devices}


async def compute_stats(services: Services, scope: str, key: str, bucket: str, start: datetime, end: datetime) -> dict:
    store = services.store
    start_ms = bucket_start(to_ms(start), bucket)
    rows = {r.bucket_ms: r for r in await store.rollup_series(scope, key, bucket, start_ms, to_ms(end))}
    series = []
    period = {"granted": 0, "refused": 0, "units": 0, "peakDevices": 0}
    b = start_ms
    while b < to_ms(end):
        values = _row(rows.get(b))
        series.append({"start": iso(from_ms(b)), **values})
        period["granted"] += values["granted"]
        period["refused"] += values["refused"]
        period["units"] += values["units"]
        period["peakDevices"] = max(period["peakDevices"], values["devices"])
        b = next_bucket(b, bucket)
    now = services.ledger.clock()
    today_ms = bucket_start(to_ms(now), "1d")
    today = await store.rollup_series(scope, key, "1d", today_ms, today_ms + 1)
    total = await store.rollup_series(scope, key, "all", 0, 1)
    return {
        "bucket": bucket,
        "from": iso(from_ms(start_ms)),
        "to": iso(end),
        "retainedFrom": retained_from(services, bucket, now),
        "series": series,
        "summary": {
            "all": _row(total[0] if total else None),
            "period": period,
            "today": _row(today[0] if today else None),
        },
        "rollupLagEvents": await store.rollup_lag(),
    }


def retained_from(services: Services, bucket: str, now: datetime) -> str | None:
    """The first bucket of this size still kept ([stats] retention tiers), or None when they are kept for good.
    Older buckets are pruned within the hour after they pass the horizon, and read as zeros."""
    stats = services.config.stats
    days = {"3m": stats.hourly_days, "2h": stats.hourly_days, "1d": stats.daily_days}.get(bucket, 0)
    if not days:
        return None
    horizon = to_ms(now) - days * DAY_MS
    first = bucket_start(horizon, bucket)
    return iso(from_ms(first if first == horizon else next_bucket(first, bucket)))


def item_status(services: Services, item_id: str) -> dict:
    ledger = services.ledger
    item = ledger.items[item_id]
    status = ledger.status(item_id)
    now = ledger.clock()
    out: dict = {
        "itemId": item.item_id,
        "licenseId": item.license_id,
        "product": item.product,
        "edition": item.edition,
        "deploymentType": item.deployment_type.value,
        "licenseType": item.license_type.value,
        "quantity": item.quantity,
        "startsAt": iso(item.starts_at),
        "expiresAt": iso(item.expires_at),
        "daysToExpiry": (item.expires_at - now).days,
        "revoked": status.revoked,
    }
    view = item_state(item, status, now)
    out["state"] = view.state.value
    out["stateDetail"] = view.detail
    counts = item.rules.counts
    if counts is Counts.SEATS:
        out["seats"] = {"used": status.seats_used, "quantity": item.quantity,
                        "limit": hard_limit(item.license_type, item.quantity)}
    elif counts is Counts.UNITS:
        out["units"] = {"used": status.units_used, "quantity": item.quantity,
                        "limit": hard_limit(item.license_type, item.quantity)}
    elif counts in (Counts.CONCURRENCY, Counts.INSTANCES):
        out["overuse"] = {"used": status.overuse_used, "tolerance": tolerance(item.quantity),
                          "left": max(0, tolerance(item.quantity) - status.overuse_used),
                          "overused": status.overused}
    if item.domain:
        out["domain"] = item.domain
    if item.borrow_max_days is not None:
        out["borrowMaxDays"] = item.borrow_max_days
    if item.versions is not None:
        out["versions"] = item.versions
    if counts is Counts.CONCURRENCY and item.borrow_max_days is not None:
        out["borrowed"] = {"used": status.seats_used, "limit": item.quantity}
    waiting = ledger.queue.waiting(item_id)
    if waiting:
        out["waiting"] = waiting
    limits = ledger.seat_limits(item_id)
    if limits:
        out["codeLimits"] = {name: {"reservedSeats": lim.reserved_seats, "maxSeats": lim.max_seats, "held": held}
                             for name, (lim, held) in sorted(limits.items())}
        if (warning := over_quantity(item, {name: lim for name, (lim, _) in limits.items()})) is not None:
            out["limitsWarning"] = warning
    return out


def problems_first(statuses: list[dict]) -> list[dict]:
    """Item statuses with the most pressing state first, then by item id."""
    return sorted(statuses, key=lambda s: (SEVERITY[ItemState(s["state"])], s["itemId"]))


def usage_text(status: dict) -> str:
    """An item's use for people: '12 / 50 seats', '1,200 / 100,000 units', 'overuse 3 / 8,000'."""
    if "seats" in status:
        return f"{status['seats']['used']:,} / {status['seats']['quantity']:,} seats"
    if "units" in status:
        return f"{status['units']['used']:,} / {status['units']['quantity']:,} units"
    if "overuse" in status:
        borrowed = f", {status['borrowed']['used']:,} borrowed" if status.get("borrowed", {}).get("used") else ""
        return f"overuse {status['overuse']['used']:,} / {status['overuse']['tolerance']:,}{borrowed}"
    return "unlimited"


async def code_stats(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    name = request.match_info["code"]
    bucket, start, end = _range(request, services)
    code = services.ledger.codes.get(name)
    body = await compute_stats(services, "code", name, bucket, start, end)
    if code is None and not body["summary"]["all"]["granted"] and not body["summary"]["all"]["refused"] \
            and not await _ever_existed(services, name):
        raise ApiError(404, f"no such handshake code {name}")
    body = {"code": name, "exists": code is not None,
            "items": [item_status(services, i) for i in services.ledger.ordered_items(code) if i in services.ledger.items]
            if code else [], **body}
    return web.json_response(body)


async def _ever_existed(services: Services, name: str) -> bool:
    """A deleted code keeps its statistics, also when they are all zero: its creation is in the event log."""
    async for _ in services.store.events(EventQuery(code=name, type="code.created")):
        return True
    return False


async def item_stats(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    item_id = request.match_info["item_id"]
    if item_id not in services.ledger.items:
        raise ApiError(404, f"no such item {item_id}")
    bucket, start, end = _range(request, services)
    body = await compute_stats(services, "item", item_id, bucket, start, end)
    return web.json_response({"itemId": item_id, "status": item_status(services, item_id), **body})


# A spreadsheet runs a cell starting with one of these as a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A CSV cell: text that a spreadsheet would run as a formula gets a leading ' (OWASP), numbers stay numbers."""
    if value is None:
        return ""
    if isinstance(value, dict):
        value = json.dumps(value, separators=(",", ":"))
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


async def export_events(request: web.Request) -> web.StreamResponse:
    """Stream the event log as NDJSON (or CSV with Accept: text/csv), a page at a time."""
    services = request.app[SERVICES]
    query = EventQuery(start=_time(request, "from"), end=_time(request, "to"), code=request.query.get("code"),
                       item_id=request.query.get("item"), type=request.query.get("type"))
    as_csv = "text/csv" in request.headers.get("Accept", "")
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8" if as_csv else "application/x-ndjson",
        "Content-Disposition": f'inline; filename="events.{"csv" if as_csv else "ndjson"}"',
    })
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if as_csv:
        writer.writerow(EVENT_FIELDS)
    pending = 0
    async for stored in services.store.events(query):
        if as_csv:
            writer.writerow([csv_cell(v) for v in event_values(stored)])
        else:
            buffer.write(archive_line(stored))
        pending += 1
        if pending >= 500:
            await response.write(buffer.getvalue().encode())
            buffer.seek(0)
            buffer.truncate()
            pending = 0
    await response.write(buffer.getvalue().encode())
    await response.write_eof()
    return response


def archive_json(row: ArchiveRow) -> dict:
    return {"id": row.id, "path": row.path, "firstSeq": row.first_seq, "lastSeq": row.last_seq,
            "before": iso(from_ms(row.before_ms)), "events": row.events, "bytes": row.bytes,
            "createdAt": iso(from_ms(row.created_ms)), "done": row.done_ms is not None}


async def archive_events(request: web.Request) -> web.Response:
    """Move device events before `before` (and folded into the statistics) into archive files now."""
    services = request.app[SERVICES]
    body: ArchiveBody = decode_json(await read_json_body(request), ArchiveBody)
    before = query_time("before", body.before)
    now = services.ledger.clock()
    if before > now - ARCHIVE_MIN_AGE:
        raise ApiError(400, f"before: {body.before!r} is less than an hour ago; other nodes of a cluster may not "
                            "have read those events yet", "before")
    report = await services.archiver.run(before, now)
    return web.json_response({
        "events": report.events, "files": [archive_json(r) for r in report.files],
        "resumed": report.resumed, "resumedEvents": report.resumed_events,
        "folder": str(services.archiver.folder), "rollupLagEvents": await services.store.rollup_lag(),
    })


async def list_archives(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return web.json_response({"archives": [archive_json(r) for r in await services.store.event_archives()]})
