"""Admin endpoints of trust (issue 20): usage statements, the clock, device bindings (clone detection)."""

from __future__ import annotations

from datetime import datetime, timedelta

from aiohttp import web

from lts_server import logs
from lts_server.core.times import from_ms, iso, to_ms
from lts_server.ledger import Undo
from lts_server.statements import Exporter, StatementError
from lts_server.store import Event, WriteBatch
from lts_server.store.sql_trust import StatementRow, TrustOperations, clock_accept_extra
from lts_server.web.errors import ApiError, query_int
from lts_server.web.services import SERVICES, Services
from lts_server.web.stats import query_time

EXPORT_PATH = "/api/v1/usage/export"
STATEMENT_TYPE = "text/plain; charset=utf-8"
CLONES_DAYS = 30


def _trust_store(services: Services) -> TrustOperations:
    store = services.store
    assert isinstance(store, TrustOperations)
    return store


def statement_json(row: StatementRow) -> dict[str, object]:
    return {"statementId": row.id, "createdAt": iso(from_ms(row.created_ms)),
            "since": iso(from_ms(row.since_ms)) if row.since_ms is not None else None,
            "until": iso(from_ms(row.until_ms)), "previous": row.previous, "sha256": row.sha256,
            "heads": {chain: {"seq": seq, "hash": digest} for chain, (seq, digest) in row.heads.items()}}


async def export_usage(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/usage/export?since&until (admin): the next usage statement; ?statement=ID writes an earlier
    one again, byte for byte."""
    services = request.app[SERVICES]
    store = _trust_store(services)
    exporter = Exporter(store, services.ledger, services.identity)
    response = web.StreamResponse(headers={"Content-Type": STATEMENT_TYPE, "Cache-Control": "no-store"})

    async def write(data: bytes) -> None:
        if not response.prepared:
            await response.prepare(request)
        await response.write(data)

    again = query_int(request, "statement", None, 1, 2**31 - 1)
    if again is not None:
        row = await store.statement(again)
        if row is None:
            raise ApiError(404, f"no usage statement {again}")
        response.headers["Content-Disposition"] = f'attachment; filename="usage-{row.id}.statement"'
        job = exporter.again(row, write)
    else:
        now = services.ledger.clock()
        since = query_time("since", request.query["since"]) if request.query.get("since") else None
        until = query_time("until", request.query["until"]) if request.query.get("until") else now
        tolerance = timedelta(seconds=services.config.clock.tolerance)
        if until > now + tolerance:
            raise ApiError(400, f"until: {iso(until)} is in the future (the server's clock reads {iso(now)}); a "
                                "statement covers what was recorded", "until")
        if since is not None and since >= until:
            raise ApiError(400, "since: must be before until", "since")
        if services.clock is not None and services.clock.behind(now) is not None:
            raise ApiError(409, "the server's clock is behind its records: fix it or accept it (ltsctl clock accept) "
                                "before exporting")
        response.headers["Content-Disposition"] = 'attachment; filename="usage.statement"'
        job = exporter.export(write, since, min(until, now), now)
    try:
        await job
    except Exception as e:
        if not response.prepared:
            if isinstance(e, StatementError):
                raise ApiError(409, str(e)) from None
            raise
        # Begun: the answer ends without its signed summary line, which every reader takes as incomplete.
        logs.event("usage.export_failed", logs.logging.ERROR, error=str(e))
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    return response


async def list_statements(request: web.Request) -> web.Response:
    store = _trust_store(request.app[SERVICES])
    return web.json_response({"statements": [statement_json(r) for r in await store.statements()]})


async def clock_status(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if services.clock is None:
        raise ApiError(404, "this server does not watch its clock")
    return web.json_response({**services.clock.status().to_json(), "toleranceSeconds": services.config.clock.tolerance})


async def accept_clock(request: web.Request) -> web.Response:
    """The admin accepts the clock as it is: the server serves again; time-limited items are still judged no
    earlier than the latest time it recorded (lts_server/clock.py). An event in the usage chain says so."""
    services = request.app[SERVICES]
    guard = services.clock
    if guard is None:
        raise ApiError(404, "this server does not watch its clock")
    status = guard.status()
    if status.behind is None or status.latest is None:
        raise ApiError(409, f"the clock ({iso(status.now)}) is not behind the latest time recorded "
                            f"({iso(status.latest) if status.latest else 'none'}) by more than "
                            f"{services.config.clock.tolerance:g} s: nothing to accept")
    floor = guard.floor() or status.latest
    behind = status.behind

    def run(now: datetime, batch: WriteBatch, undo: Undo) -> None:
        batch.extras.append(clock_accept_extra(to_ms(status.now), to_ms(floor)))
        batch.events.append(Event(at=status.now, type="clock.accepted", detail={
            "clock": iso(status.now), "latestRecorded": iso(status.latest or status.now), "floor": iso(floor),
            "behindSeconds": round(behind.total_seconds(), 3)}))

    await services.ledger.submit(run)
    guard.load(await _trust_store(services).clock_state())
    return web.json_response({**guard.status().to_json(), "accepted": True,
                              "acceptedBehindSeconds": round(behind.total_seconds(), 3)})


def _client(request: web.Request) -> str:
    client = request.match_info["client_uuid"]
    if not client or len(client) > 128:
        raise ApiError(400, "clientUuid: 1-128 characters", "clientUuid")
    return client


async def device_binding(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    client = _client(request)
    row = await _trust_store(services).device_binding(client)
    if row is None:
        raise ApiError(404, f"device {client} is not bound to a fingerprint")
    return web.json_response({"clientUuid": client, "bound": True, "boundAt": iso(from_ms(row.bound_ms)),
                              "lastCloneAt": iso(from_ms(row.clone_ms)) if row.clone_ms else None,
                              "clones": row.clones})


async def reset_device_binding(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    client = _client(request)
    await services.ledger.reset_device_binding(client)
    return web.json_response({"clientUuid": client, "reset": True})


async def recent_clones(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    days = query_int(request, "days", CLONES_DAYS, 1, 3650)
    assert days is not None
    since = services.ledger.clock() - timedelta(days=days)
    rows = await _trust_store(services).recent_clones(to_ms(since))
    return web.json_response({"clones": [{"clientUuid": r.client_uuid, "boundAt": iso(from_ms(r.bound_ms)),
                                          "lastCloneAt": iso(from_ms(r.clone_ms)) if r.clone_ms else None,
                                          "clones": r.clones} for r in rows]})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get(EXPORT_PATH, export_usage)
    r.add_get("/api/v1/admin/usage/statements", list_statements)
    r.add_get("/api/v1/admin/clock", clock_status)
    r.add_post("/api/v1/admin/clock/accept", accept_clock)
    r.add_get("/api/v1/admin/devices/clones", recent_clones)
    r.add_get("/api/v1/admin/devices/{client_uuid}/binding", device_binding)
    r.add_delete("/api/v1/admin/devices/{client_uuid}/binding", reset_device_binding)
