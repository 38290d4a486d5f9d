"""The portal's Alerts page: conditions met now, recipients, webhooks, kinds, a test, the history.

Same operations as the admin API (web/alerts.py), behind the portal's session and CSRF checks.
"""

from __future__ import annotations

import secrets

from aiohttp import web

from lts_server.alerts import delivery_json
from lts_server.core.alerts import Kind
from lts_server.core.times import from_ms, iso, to_ms
from lts_server.web.alerts import check_recipients, check_webhook_url, settings_json
from lts_server.web.errors import ApiError
from lts_server.web.portal import _flash_refusal, _form, _logged_in, _redirect, _render
from lts_server.web.services import SERVICES

HISTORY_PAGE = 20
KIND_NAMES = {
    Kind.SEATS: "Seats of per-device and per-server items (60%, 80%, 100%, 110%)",
    Kind.UNITS: "Units of per-scan and per-page items (60%, 80%, 100%, 105%)",
    Kind.OVERUSE: "Overuse allowance of concurrent items (60%, 80%, 100%)",
    Kind.FAILURES: "Failed authorizations per handshake code (10% to 100%)",
    Kind.EXPIRY: "Items expiring within 30 and 7 days, and expired",
    Kind.IMPORT: "License files rejected by the importer",
}


def _when(ms: int) -> str:
    return iso(from_ms(ms))[:16].replace("T", " ")


async def alerts_page(request: web.Request) -> web.Response:
    page = await _logged_in(request)
    services = request.app[SERVICES]
    _, met = await services.alerts.current()
    settings = await settings_json(services)
    raw = request.query.get("before", "")
    before = int(raw) if raw.isdigit() else None
    history = await services.store.alert_history(HISTORY_PAGE, before)
    rows = [{"id": a.id, "when": _when(a.created_ms), "type": a.type, "subject": a.subject,
             "deliveries": [delivery_json(d) for d in a.deliveries]} for a in history]
    return _render(request, "alerts.html", "Alerts", nav="alerts", met=met, settings=settings,
                   kinds=[(k.value, KIND_NAMES[k]) for k in Kind], history=rows,
                   next_before=history[-1].id if len(history) == HISTORY_PAGE else None, paged=before is not None,
                   **page)


async def settings_submit(request: web.Request) -> web.Response:
    _, form = await _form(request)
    services = request.app[SERVICES]
    try:
        addresses = check_recipients(str(form.get("recipients", "")))
    except ApiError as e:
        raise _redirect("/portal/alerts", _flash_refusal(e)) from None
    await services.store.set_alert_recipients("; ".join(addresses))
    chosen = set(form.getall("kinds", []))
    await services.store.set_disabled_alert_kinds(frozenset(k.value for k in Kind if k.value not in chosen))
    raise _redirect("/portal/alerts", ("ok", f"Saved: {len(addresses)} recipient(s), {len(chosen & {k.value for k in Kind})} "
                                             "kind(s) of condition on."))


async def webhook_add(request: web.Request) -> web.Response:
    _, form = await _form(request)
    services = request.app[SERVICES]
    secret = str(form.get("secret", "")) or secrets.token_urlsafe(32)
    try:
        url = check_webhook_url(str(form.get("url", "")))
        if len(secret) < 16:
            raise ApiError(400, "the secret must have 16 characters or more")
    except ApiError as e:
        raise _redirect("/portal/alerts", _flash_refusal(e)) from None
    hook = await services.store.add_webhook(url, secret, to_ms(services.ledger.clock()))
    raise _redirect("/portal/alerts", ("ok", f"Webhook {hook.id} added. Its signing secret, shown only now: {secret}"))


async def webhook_delete(request: web.Request) -> web.Response:
    _, _ = await _form(request)
    raw = request.match_info["webhook_id"]
    if not raw.isdigit() or not await request.app[SERVICES].store.delete_webhook(int(raw)):
        raise _redirect("/portal/alerts", ("error", f"No webhook {raw}."))
    raise _redirect("/portal/alerts", ("ok", f"Webhook {raw} removed."))


async def send_test(request: web.Request) -> web.Response:
    _, _ = await _form(request)
    alert_id = await request.app[SERVICES].alerts.send_test()
    raise _redirect("/portal/alerts", ("ok", f"Test notification {alert_id} queued; its deliveries are in the history."))


async def check_now(request: web.Request) -> web.Response:
    _, _ = await _form(request)
    outcome = await request.app[SERVICES].alerts.check()
    text = f"Alert {outcome.alert_id} raised: {len(outcome.new)} new condition(s)." if outcome.new else "Nothing new."
    raise _redirect("/portal/alerts", ("ok", text))


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/portal/alerts", alerts_page)
    r.add_post("/portal/alerts/settings", settings_submit)
    r.add_post("/portal/alerts/webhooks", webhook_add)
    r.add_post("/portal/alerts/webhooks/{webhook_id}/delete", webhook_delete)
    r.add_post("/portal/alerts/test", send_test)
    r.add_post("/portal/alerts/check", check_now)
