"""The portal's seat-holders page of an item, and dismissing a rejected import.

Same operations as the admin API (web/holders.py, POST /api/v1/admin/imports/dismiss), behind the portal's
session and CSRF checks. A force-release asks for a confirmation in the browser and is recorded as an event.
"""

from __future__ import annotations

import urllib.parse

from aiohttp import web

from lts_server.ledger import NotFound
from lts_server.web.admin import release_warning
from lts_server.web.errors import ApiError
from lts_server.web.holders import holders, release
from lts_server.web.portal import Pager, _flash_refusal, _for_people, _form, _logged_in, _redirect, _render
from lts_server.web.services import SERVICES
from lts_server.web.stats import item_status

PER_PAGE = 50


def _when(value: str) -> str:
    return value[:19].replace("T", " ")


async def holders_page(request: web.Request) -> web.Response:
    page = await _logged_in(request)
    services = request.app[SERVICES]
    item_id = request.match_info["item_id"]
    if item_id not in services.ledger.items:
        raise web.HTTPNotFound(text=f"There is no license item {item_id}.")
    raw = request.query.get("page", "1")
    number = max(1, int(raw)) if raw.isdigit() else 1
    listing = await holders(services, item_id, PER_PAGE, (number - 1) * PER_PAGE)
    pages = max(1, -(-listing["total"] // PER_PAGE))
    if number > pages:
        raise _redirect(f"/portal/items/{urllib.parse.quote(item_id)}/holders?page={pages}")
    rows = [{**h, "since": _when(h["since"]), "lastSeen": _when(h["lastSeen"]), "expiresAt": _when(h["expiresAt"]),
             "borrowedUntil": _when(h["borrowedUntil"]) if h.get("borrowedUntil") else None}
            for h in listing["holders"]]
    first = (number - 1) * PER_PAGE + 1
    pager = Pager(listing["total"], first, first + len(rows) - 1, number, pages,
                  f"?page={number - 1}" if number > 1 else None, f"?page={number + 1}" if number < pages else None)
    return _render(request, "holders.html", f"Seat holders of {item_id}", nav="items", item=_for_people(
        item_status(services, item_id)), listing=listing, rows=rows, pager=pager, **page)


async def holder_release(request: web.Request) -> web.Response:
    _, _ = await _form(request)
    services = request.app[SERVICES]
    item_id, client = request.match_info["item_id"], request.match_info["client_uuid"]
    back = f"/portal/items/{urllib.parse.quote(item_id)}/holders"
    try:
        seat = await release(services, item_id, client)
    except NotFound:
        raise _redirect(back, ("error", f"Device {client} holds nothing of item {item_id} any more.")) from None
    warning = release_warning(seat, services.ledger.clock()) if seat is not None else None
    note = f" Note: {warning}." if warning else ""
    raise _redirect(back, ("ok", f"Released {client} from item {item_id}; the release is recorded as an event.{note}"))


async def dismiss_submit(request: web.Request) -> web.Response:
    _, form = await _form(request)
    services = request.app[SERVICES]
    path = str(form.get("path", ""))
    try:
        await services.ledger.dismiss_rejection(path)
    except NotFound:
        raise _redirect("/portal/items", ("error", f"{path} is not a rejected file any more.")) from None
    except ApiError as e:
        raise _redirect("/portal/items", _flash_refusal(e)) from None
    services.alerts.request_check()
    raise _redirect("/portal/items", ("ok", f"Dismissed the rejection of {path}; a changed file is tried again."))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/portal/items/{item_id}/holders", holders_page)
    app.router.add_post("/portal/items/{item_id}/holders/{client_uuid}/release", holder_release)
    app.router.add_post("/portal/imports/dismiss", dismiss_submit)
