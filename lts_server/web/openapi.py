"""The OpenAPI 3 document, generated from the msgspec types that validate requests and shape answers.

ROUTES is the one list of operations: each names its request and answer types, the statuses it
can return and its query parameters. tests/test_openapi_fuzz.py runs schemathesis over this
document against a live server, so an answer that the document does not describe fails the suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import msgspec
from aiohttp import web

import lts_server
from lts_server.core.usage import SERIES
from lts_server.metrics import CONTENT_TYPE as METRICS_TYPE
from lts_server.web import alerts, schemas

REF = "#/components/schemas/{name}"
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "integer"}, "sdkCode": {"type": "integer"}, "message": {"type": "string"},
        "field": {"type": "string"}, "reason": {"type": "string"},
        "protocolVersions": {"type": "array", "items": {"type": "integer"},
                             "description": "105: the protocol versions this server speaks"},
        "versions": {"type": "string", "description": "107: the client versions the item serves (PEP 440)"},
        "queuePosition": {"type": "integer", "description": "120 after waitSeconds: the place in the queue"},
        "queueFull": {"type": "boolean", "description": "120: the queue was full ([queue] max_waiting)"}}}}}
OBJECT = {"type": "object"}
ADMIN = [{"bearer": []}]
DATE_TIME = {"type": "string", "format": "date-time"}

# What each status means, for every operation that can return it.
STATUS_TEXT = {
    "200": "OK", "201": "Created", "202": "Accepted: under way",
    "400": "Malformed request: the message (and `field`) say what. Includes JSON nested over 16 levels, text "
           "with U+0000 or a lone surrogate (body, path, query), and a value the database cannot store",
    "401": "Missing, unknown or expired admin token (login: wrong password; usage: no X-LTS-Report-MAC)",
    "403": "Admin setup required (device endpoints: a licensing refusal, code 100-160)",
    "404": "No such thing", "408": "The request head or body did not arrive in time",
    "409": "Conflicts with the current state (name taken, setup already done, default code, nothing to accept, "
           "a return of a seat that is not borrowed)",
    "422": "License file rejected: `reason` says why",
    "429": "Too many failed password attempts from this address",
    "503": "Not now: storage unavailable (locked, busy or unreachable) or full, a standby whose main is up "
           "(code 100), a clock behind the server's records (code 160), shutting down, or too many open "
           "connections; retry after Retry-After seconds",
}
# Every operation can meet these: a malformed request, a slow client, a busy server.
ALWAYS = ("400", "408", "503")
# Every admin operation but setup and login: no token, or no password set yet.
ADMIN_STATUSES = ("401", "403")


def query(name: str, description: str, schema: dict | None = None) -> dict:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


STATS_QUERY = (
    query("bucket", "Bucket size (default 2h; 1mo: calendar months, UTC)", {"type": "string", "enum": list(SERIES)}),
    query("from", "Start of the period (ISO 8601 with zone, 1970 to 9000)", DATE_TIME),
    query("to", "End of the period (ISO 8601 with zone, 1970 to 9000; default now)", DATE_TIME),
)
EVENTS_QUERY = (
    query("from", "Events at or after this time", DATE_TIME),
    query("to", "Events before this time", DATE_TIME),
    query("code", "Only events of this handshake code"),
    query("item", "Only events of this item"),
    query("type", "Only events of this type (see docs/api.md for the list)"),
)


@dataclass(frozen=True)
class Route:
    path: str
    method: str
    summary: str
    request: type | None = None
    # The 2xx answer's type; None: a JSON object described in docs/api.md.
    response: type | None = None
    admin: bool = False
    statuses: tuple[str, ...] = ("200",)
    params: tuple[dict, ...] = ()
    # Content types of the 2xx answer, when not JSON.
    produces: tuple[str, ...] = ("application/json",)
    request_content: str = "application/json"


ROUTES: list[Route] = [
    Route("/healthz", "get", "Process alive", response=schemas.Health),
    Route("/readyz", "get", "Database open, migrated and writable", response=schemas.Health),
    Route("/api/v1/server", "get", "Server UUID, version and identity key (it signs authorizations)",
          response=schemas.ServerInfo),
    Route("/api/v1/servers", "get", "Server URL list (main, standby) for clients", response=schemas.ServerList),
    Route("/api/v1/openapi.json", "get", "This document"),
    Route("/api/v1/handshake", "post", "Device handshake: a signed authorization or a licensing error",
          schemas.HandshakeBody, schemas.HandshakeAnswer, statuses=("200", "403")),
    Route("/api/v1/handshake/return", "post", "Give a borrowed seat back early; signed with the device's "
          "reportKey, idempotent", schemas.ReturnBody, schemas.ReturnAnswer, statuses=("200", "401", "403", "409"),
          params=({"name": "X-LTS-Report-MAC", "in": "header", "required": False,
                   "description": "base64 HMAC-SHA256 of the exact body under the reportKey of the device's "
                                  "newest handshake answer for the code (missing: 401, wrong: 403)",
                   "schema": {"type": "string"}},)),
    Route("/api/v1/usage", "post", "Usage report, idempotent by reportId, signed with the device's reportKey",
          schemas.UsageBody, schemas.UsageAnswer, statuses=("200", "401", "403"),
          params=({"name": "X-LTS-Report-MAC", "in": "header", "required": False,
                   "description": "base64 HMAC-SHA256 of the exact body under the reportKey of the device's "
                                  "newest handshake answer (missing: 401, wrong: 403)",
                   "schema": {"type": "string"}},)),
    Route("/api/v1/admin/setup", "post", "Set the first admin password", schemas.SetupBody, schemas.SetupAnswer,
          statuses=("201", "409")),
    Route("/api/v1/admin/login", "post", "Log in: a bearer token", schemas.LoginBody, schemas.TokenAnswer,
          statuses=("200", "401", "403", "429")),
    Route("/api/v1/admin/logout", "post", "End this token", admin=True),
    Route("/api/v1/admin/password", "post", "Change the password (ends every session)", schemas.PasswordChangeBody,
          schemas.PasswordChanged, admin=True, statuses=("200", "429")),
    Route("/api/v1/admin/status", "get", "Server status", admin=True),
    Route("/api/v1/admin/handshake-codes", "get", "List handshake codes", admin=True),
    Route("/api/v1/admin/handshake-codes", "post", "Create a handshake code", schemas.CodeCreateBody, admin=True,
          statuses=("201", "409")),
    Route("/api/v1/admin/handshake-codes/{name}", "get", "One handshake code", admin=True, statuses=("200", "404")),
    Route("/api/v1/admin/handshake-codes/{name}", "patch", "Edit a handshake code", schemas.CodeEditBody, admin=True,
          statuses=("200", "404", "409")),
    Route("/api/v1/admin/handshake-codes/{name}", "delete",
          "Delete a handshake code (history stays; a default code only with ?confirm=default)", admin=True,
          statuses=("200", "404", "409"),
          params=(query("confirm", "`default` to delete a default code", {"type": "string", "enum": ["default"]}),)),
    Route("/api/v1/admin/handshake-codes/{name}/usage-order", "put", "Set a custom usage order",
          schemas.UsageOrderBody, admin=True, statuses=("200", "404")),
    Route("/api/v1/admin/handshake-codes/{name}/usage-order", "delete", "Back to the default usage order",
          admin=True, statuses=("200", "404")),
    Route("/api/v1/admin/licenses", "get", "List imported licenses", admin=True),
    Route("/api/v1/admin/licenses", "post", "Upload a license file (the raw file as the body)", admin=True,
          statuses=("200", "201", "422"), params=(query("name", "The file's name, for the import record"),),
          request_content="application/octet-stream"),
    Route("/api/v1/admin/licenses/{license_id}", "get", "One license with its file text", admin=True,
          statuses=("200", "404")),
    Route("/api/v1/admin/licenses/{license_id}/default-code", "post",
          "Restore the license's deleted default code (all of its items)", admin=True,
          statuses=("201", "404", "409")),
    Route("/api/v1/admin/imports", "get", "State of every imported or rejected file", admin=True),
    Route("/api/v1/admin/imports/dismiss", "post",
          "Dismiss a rejection (by path or file name): it stops alerting and counting", schemas.ImportDismissBody,
          admin=True, statuses=("200", "404", "409")),
    Route("/api/v1/admin/items", "get", "Items with their live status", admin=True),
    Route("/api/v1/admin/items/{item_id}/revoke", "post", "Revoke an item", admin=True, statuses=("200", "404")),
    Route("/api/v1/admin/items/{item_id}/restore", "post", "Restore a revoked item", admin=True,
          statuses=("200", "404")),
    Route("/api/v1/admin/items/{item_id}/devices", "get", "Devices holding seats on an item", admin=True,
          statuses=("200", "404")),
    Route("/api/v1/admin/items/{item_id}/devices/{client_uuid}", "delete",
          "Force-release a seat (a borrowed one too: its device keeps working offline until borrowedUntil)",
          admin=True, statuses=("200", "404")),
    Route("/api/v1/admin/items/{item_id}/holders", "get",
          "Who holds the item (seats, or running authorizations on items without seats), a page at a time",
          admin=True, statuses=("200", "404"),
          params=(query("limit", "Holders per page (1-10000, default 100)", {"type": "integer", "minimum": 1}),
                  query("offset", "Holders to skip (the previous answer's next)", {"type": "integer", "minimum": 0}))),
    Route("/api/v1/admin/items/{item_id}/holders/{client_uuid}", "delete",
          "Force-release a holder: its seat, or its running authorization (recorded as seat.released); a "
          "borrowed seat's device keeps working offline until borrowedUntil",
          admin=True, statuses=("200", "404")),
    Route("/api/v1/admin/stats/codes/{code}", "get", "Statistics of a handshake code (also a deleted one)",
          admin=True, statuses=("200", "404"), params=STATS_QUERY),
    Route("/api/v1/admin/stats/items/{item_id}", "get", "Statistics and status of an item", admin=True,
          statuses=("200", "404"), params=STATS_QUERY),
    Route("/api/v1/admin/events", "get", "Export the event log: NDJSON, or CSV with Accept: text/csv", admin=True,
          params=EVENTS_QUERY, produces=("application/x-ndjson", "text/csv")),
    Route("/api/v1/admin/events/archive", "post",
          "Archive device events stamped before `before` (and already in the statistics) into compressed NDJSON "
          "files on this node, then delete them from the database", schemas.ArchiveBody, admin=True),
    Route("/api/v1/admin/events/archives", "get", "Archive files written so far, by every node", admin=True),
    Route("/api/v1/admin/alerts", "get", "Alert settings: recipients, webhooks, conditions, SMTP", admin=True),
    Route("/api/v1/admin/alerts/recipients", "get", "E-mail recipients of alerts", admin=True),
    Route("/api/v1/admin/alerts/recipients", "put", "Set the recipients (separated by semicolons)",
          alerts.RecipientsBody, admin=True),
    Route("/api/v1/admin/alerts/webhooks", "get", "Alert webhooks", admin=True),
    Route("/api/v1/admin/alerts/webhooks", "post", "Add a webhook; its signing secret is in this answer only",
          alerts.WebhookBody, admin=True, statuses=("201",)),
    Route("/api/v1/admin/alerts/webhooks/{webhook_id}", "delete", "Remove a webhook", admin=True,
          statuses=("200", "404")),
    Route("/api/v1/admin/alerts/conditions", "get", "Which conditions alert", admin=True),
    Route("/api/v1/admin/alerts/conditions", "put", "Switch conditions on or off: {\"seats\": true, ...}",
          dict[str, bool], admin=True),
    Route("/api/v1/admin/alerts/test", "post", "Send a test notification to every recipient and webhook",
          admin=True, statuses=("202",)),
    Route("/api/v1/admin/alerts/check", "post", "Check the alert conditions now", admin=True),
    Route("/api/v1/admin/alerts/open", "get", "Conditions met at the last check", admin=True),
    Route("/api/v1/admin/alerts/retry", "post",
          "Try every pending delivery now instead of after its backoff; answers how many are pending",
          admin=True),
    Route("/api/v1/admin/alerts/history", "get", "Sent alerts, newest first, with each delivery's state",
          admin=True, params=(query("limit", "At most this many (1-200, default 50)", {"type": "integer"}),
                              query("before", "Only alerts older than this id (paging)", {"type": "integer"}))),
    Route("/api/v1/usage/export", "get",
          "The next usage statement (text, docs/authorization-format.md): every usage chain's events since the "
          "last statement, per-item totals, signed by the identity key", admin=True, statuses=("200", "404", "409"),
          params=(query("since", "The first statement starts at events stamped here", DATE_TIME),
                  query("until", "Up to the last event recorded by then, not in the future (default now)", DATE_TIME),
                  query("statement", "Write this earlier statement again, byte for byte", {"type": "integer"})),
          produces=("text/plain",)),
    Route("/api/v1/admin/usage/statements", "get", "Usage statements exported so far", admin=True),
    Route("/api/v1/admin/clock", "get", "The clock against the latest time the server recorded", admin=True),
    Route("/api/v1/admin/clock/accept", "post",
          "Accept a clock set back: serve again (time-limited items are still judged no earlier than the "
          "records' latest time); an event", admin=True, statuses=("200", "409")),
    Route("/api/v1/admin/devices/clones", "get", "Devices refused as clones (151) lately", admin=True,
          params=(query("days", "Over the last DAYS days (1-3650, default 30)", {"type": "integer"}),)),
    Route("/api/v1/admin/devices/{client_uuid}/binding", "get", "The fingerprint binding of a device", admin=True,
          statuses=("200", "404")),
    Route("/api/v1/admin/devices/{client_uuid}/binding", "delete",
          "Reset a device's fingerprint binding (an event): its next grant binds it again", admin=True,
          statuses=("200", "404")),
    Route("/metrics", "get", "Prometheus metrics: a bearer token ([metrics] token_file, or an admin token) on the "
          "device listener", statuses=("200", "401", "404"), produces=(METRICS_TYPE.split(";")[0],)),
]


def _answer(route: Route, status: str, by_type: dict[type, dict]) -> dict:
    if not status.startswith("2"):
        return {"description": STATUS_TEXT[status], "content": {"application/json": {"schema": ERROR}}}
    if route.produces != ("application/json",):
        return {"description": STATUS_TEXT[status],
                "content": {kind: {"schema": {"type": "string"}} for kind in route.produces}}
    schema = by_type[route.response] if route.response is not None else OBJECT
    return {"description": STATUS_TEXT[status], "content": {"application/json": {"schema": schema}}}


def _operation(route: Route, by_type: dict[type, dict]) -> dict:
    statuses = sorted({*route.statuses, *ALWAYS, *(ADMIN_STATUSES if route.admin else ())})
    op: dict = {"summary": route.summary, "operationId": f"{route.method}{route.path}",
                "responses": {s: _answer(route, s, by_type) for s in statuses}}
    if route.request is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": by_type[route.request]}}}
    elif route.request_content != "application/json":
        op["requestBody"] = {"required": True, "content": {route.request_content: {
            "schema": {"type": "string", "format": "binary"}}}}
    if route.admin:
        op["security"] = ADMIN
    params = [{"name": part[1:-1], "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
              for part in route.path.split("/") if part.startswith("{")]
    params += route.params
    if params:
        op["parameters"] = params
    return op


@cache
def document() -> dict:
    types = sorted({t for r in ROUTES for t in (r.request, r.response) if t is not None}, key=lambda t: t.__name__)
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    by_type = dict(zip(types, refs))
    paths: dict[str, dict] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route, by_type)
    return {
        "openapi": "3.0.3",
        "info": {"title": "lts-server", "version": lts_server.__version__,
                 "description": "The device and admin API of lts-server; docs/api.md explains each operation."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


async def handler(request: web.Request) -> web.Response:
    return web.json_response(document())
