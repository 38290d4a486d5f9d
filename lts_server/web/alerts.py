"""The admin API of usage alerts: recipients, webhooks, conditions, a test, the history, a check now."""

from __future__ import annotations

import re
import secrets
import urllib.parse
from typing import Annotated

import msgspec
from aiohttp import web

from lts_server.alerts import delivery_json, open_condition_json
from lts_server.core.alerts import Kind
from lts_server.core.times import from_ms, iso, to_ms
from lts_server.store.sql_alerts import NO_BOUND, split_recipients
from lts_server.web.device import read_json_body
from lts_server.web.errors import ApiError, decode_json, query_int
from lts_server.web.services import SERVICES, Services

# A practical check, not RFC 5322: one @, no spaces, a dot in the domain.
ADDRESS = re.compile(r"^[^@\s;,<>]+@[^@\s;,<>]+\.[^@\s;,<>]+$")
MAX_HISTORY = 200
MAX_ID = 2**31 - 1  # alert_webhooks.id is an INTEGER


class RecipientsBody(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    recipients: Annotated[str, msgspec.Meta(max_length=4000)]


class WebhookBody(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
    secret: Annotated[str, msgspec.Meta(min_length=16, max_length=256)] | None = None


def check_recipients(text: str) -> list[str]:
    addresses = split_recipients(text)
    for a in addresses:
        if not ADDRESS.match(a):
            raise ApiError(400, f"recipients: {a!r} is not an e-mail address; separate addresses with semicolons",
                           "recipients")
    return addresses


def check_webhook_url(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ApiError(400, f"url: expected an http:// or https:// URL, got {url!r}", "url")
    return url


async def settings_json(services: Services) -> dict:
    s = await services.store.alert_settings()
    smtp = services.config.alerts.smtp
    return {
        "recipients": s.recipients,
        "addresses": split_recipients(s.recipients),
        "webhooks": [{"id": h.id, "url": h.url, "createdAt": iso(from_ms(h.created_ms))} for h in s.webhooks],
        "conditions": {k.value: k.value not in s.disabled_kinds for k in Kind},
        "smtp": {"configured": smtp.host is not None, "host": smtp.host, "port": smtp.port, "from": smtp.from_},
        "checkSeconds": services.config.alerts.check_seconds,
        "failureWindow": {"minutes": services.config.alerts.failure_window_minutes,
                          "minRequests": services.config.alerts.failure_min_requests},
    }


async def get_settings(request: web.Request) -> web.Response:
    return web.json_response(await settings_json(request.app[SERVICES]))


async def get_recipients(request: web.Request) -> web.Response:
    s = await request.app[SERVICES].store.alert_settings()
    return web.json_response({"recipients": s.recipients, "addresses": split_recipients(s.recipients)})


async def set_recipients(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body: RecipientsBody = decode_json(await read_json_body(request), RecipientsBody)
    addresses = check_recipients(body.recipients)
    text = "; ".join(addresses)
    await services.store.set_alert_recipients(text)
    return web.json_response({"recipients": text, "addresses": addresses})


async def list_webhooks(request: web.Request) -> web.Response:
    return web.json_response({"webhooks": (await settings_json(request.app[SERVICES]))["webhooks"]})


async def add_webhook(request: web.Request) -> web.Response:
    """Add a webhook; the secret (given, or made here) is shown in this answer only."""
    services = request.app[SERVICES]
    body: WebhookBody = decode_json(await read_json_body(request), WebhookBody)
    secret = body.secret or secrets.token_urlsafe(32)
    hook = await services.store.add_webhook(check_webhook_url(body.url), secret, to_ms(services.ledger.clock()))
    return web.json_response({"id": hook.id, "url": hook.url, "secret": secret,
                              "createdAt": iso(from_ms(hook.created_ms))}, status=201)


async def delete_webhook(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    raw = request.match_info["webhook_id"]
    # Ids are the database's INTEGER: one past it (or "²", a digit to str.isdigit) names no webhook.
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_ID or not await services.store.delete_webhook(int(raw)):
        raise ApiError(404, f"no such webhook {raw}")
    return web.json_response({"deleted": int(raw)})


async def get_conditions(request: web.Request) -> web.Response:
    return web.json_response({"conditions": (await settings_json(request.app[SERVICES]))["conditions"]})


async def set_conditions(request: web.Request) -> web.Response:
    """Switch kinds on or off: {"seats": true, "failures": false}; kinds not named keep their state."""
    services = request.app[SERVICES]
    body = decode_json(await read_json_body(request), dict[str, bool])
    assert isinstance(body, dict)
    known = {k.value for k in Kind}
    for name in body:
        if name not in known:
            raise ApiError(400, f"{name}: not a condition; expected one of {', '.join(sorted(known))}", name)
    disabled = set((await services.store.alert_settings()).disabled_kinds)
    for name, on in body.items():
        (disabled.discard if on else disabled.add)(name)
    await services.store.set_disabled_alert_kinds(frozenset(disabled))
    return web.json_response({"conditions": {k.value: k.value not in disabled for k in Kind}})


async def send_test(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    alert_id = await services.alerts.send_test()
    deliveries = next((a.deliveries for a in await services.store.alert_history(1, alert_id + 1)), ())
    return web.json_response({"alertId": alert_id, "deliveries": [delivery_json(d) for d in deliveries]},
                             status=202)


async def run_check(request: web.Request) -> web.Response:
    outcome = await request.app[SERVICES].alerts.check()
    return web.json_response({"alertId": outcome.alert_id, "new": [c.key for c in outcome.new],
                              "cleared": list(outcome.cleared)})


async def open_alerts(request: web.Request) -> web.Response:
    conditions = await request.app[SERVICES].store.open_conditions()
    return web.json_response({"alerts": [open_condition_json(c) for c in conditions]})


async def history(request: web.Request) -> web.Response:
    """Notifications, newest first, with each delivery's state; page with ?before=<id>."""
    services = request.app[SERVICES]
    limit = query_int(request, "limit", 50, 1, MAX_HISTORY)
    before = query_int(request, "before", None, 1, NO_BOUND)
    assert limit is not None
    alerts = await services.store.alert_history(limit, before)
    return web.json_response({"alerts": [
        {"id": a.id, "createdAt": iso(from_ms(a.created_ms)), "type": a.type, "subject": a.subject,
         "conditions": a.conditions, "deliveries": [delivery_json(d) for d in a.deliveries]} for a in alerts],
        "next": alerts[-1].id if len(alerts) == limit else None})


async def retry(request: web.Request) -> web.Response:
    """Try every pending delivery now, instead of after its backoff (say, once SMTP is fixed)."""
    pending = await request.app[SERVICES].alerts.retry_now()
    return web.json_response({"pending": pending})


def add_routes(app: web.Application) -> None:
    base = "/api/v1/admin/alerts"
    r = app.router
    r.add_get(base, get_settings)
    r.add_get(f"{base}/recipients", get_recipients)
    r.add_put(f"{base}/recipients", set_recipients)
    r.add_get(f"{base}/webhooks", list_webhooks)
    r.add_post(f"{base}/webhooks", add_webhook)
    r.add_delete(f"{base}/webhooks/{{webhook_id}}", delete_webhook)
    r.add_get(f"{base}/conditions", get_conditions)
    r.add_put(f"{base}/conditions", set_conditions)
    r.add_post(f"{base}/test", send_test)
    r.add_post(f"{base}/check", run_check)
    r.add_post(f"{base}/retry", retry)
    r.add_get(f"{base}/open", open_alerts)
    r.add_get(f"{base}/history", history)
