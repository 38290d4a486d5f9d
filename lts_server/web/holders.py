"""Seat holders of an item: who holds it (device, since, last seen, code), a page at a time, and force-release.

Seat-counted items (per-device, per-server) list their seats; the others (concurrent devices or instances,
unit quotas, domains) list the devices whose authorization on the item still runs. Each holder has a `kind`
("seat", "grant"), so other kinds of hold add to the same listing without changing its shape.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from lts_server.core.model import Counts
from lts_server.core.times import iso, to_ms
from lts_server.ledger import NotFound
from lts_server.store import Holder, Seat
from lts_server.store.sql_alerts import NO_BOUND
from lts_server.web.admin import release_answer
from lts_server.web.errors import ApiError, query_int
from lts_server.web.services import SERVICES, Services

PAGE = 100
MAX_PAGE = 10_000


def holder_json(h: Holder) -> dict[str, Any]:
    return {"clientUuid": h.client_uuid, "kind": h.kind, "since": iso(h.since), "lastSeen": iso(h.last_seen),
            "expiresAt": iso(h.expires_at), "code": h.code,
            "borrowedUntil": iso(h.borrowed_until) if h.borrowed_until else None}


def counts_seats(services: Services, item_id: str) -> bool:
    return services.ledger.items[item_id].rules.counts is Counts.SEATS


async def holders(services: Services, item_id: str, limit: int, offset: int) -> dict[str, Any]:
    """The listing the API answers and the portal's page shows."""
    item = services.ledger.items.get(item_id)
    if item is None:
        raise ApiError(404, f"no such item {item_id}; `ltsctl items list` shows what exists")
    now_ms = to_ms(services.ledger.clock())
    total, page = await services.store.item_holders(item_id, counts_seats(services, item_id), now_ms, limit, offset)
    more = offset + len(page) < total and len(page) == limit
    return {"itemId": item_id, "licenseType": item.license_type.value, "quantity": item.quantity, "total": total,
            "offset": offset, "next": offset + limit if more else None, "holders": [holder_json(h) for h in page]}


async def list_holders(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", PAGE, 1, MAX_PAGE)
    offset = query_int(request, "offset", 0, 0, NO_BOUND)
    assert limit is not None and offset is not None
    return web.json_response(await holders(request.app[SERVICES], request.match_info["item_id"], limit, offset))


async def release(services: Services, item_id: str, client_uuid: str) -> Seat | None:
    """Free the device's seat, or end its running authorization on an item without seats (an event either way).
    Returns the seat freed (None: an authorization ended), whose borrow the admin must hear of."""
    if item_id not in services.ledger.items:
        raise ApiError(404, f"no such item {item_id}; `ltsctl items list` shows what exists")
    if not counts_seats(services, item_id):
        try:  # a concurrent item's borrowed seat: freed like any seat, its authorizations end with it
            seat = await services.ledger.release_seat(item_id, client_uuid)
        except NotFound:
            await services.ledger.end_grant(item_id, client_uuid)
            return None
    else:
        seat = await services.ledger.release_seat(item_id, client_uuid)
    return seat


async def release_holder(request: web.Request) -> web.Response:
    item_id, client = request.match_info["item_id"], request.match_info["client_uuid"]
    services = request.app[SERVICES]
    seat = await release(services, item_id, client)
    return web.json_response(release_answer(client, item_id, seat, services.ledger.clock()))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/admin/items/{item_id}/holders", list_holders)
    app.router.add_delete("/api/v1/admin/items/{item_id}/holders/{client_uuid}", release_holder)
