"""The OpenAPI 3 document, generated from the msgspec types that validate requests."""

from __future__ import annotations

from functools import cache

import msgspec
from aiohttp import web

import lts_server
from lts_server.web import alerts, schemas

REF = "#/components/schemas/{name}"
ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "code": {"type": "integer"}, "sdkCode": {"type": "integer"}, "message": {"type": "string"},
    "field": {"type": "string"}}, "required": ["code", "message"]}}}
ADMIN = [{"bearer": []}]

# path, method, summary, request type, response type, admin?
ROUTES: list[tuple[str, str, str, type | None, type | None, bool]] = [
    ("/healthz", "get", "Process alive", None, None, False),
    ("/readyz", "get", "Database open and migrated", None, None, False),
    ("/api/v1/server", "get", "Server UUID, version and signing key", None, schemas.ServerInfo, False),
    ("/api/v1/servers", "get", "Server URL list (main, standby) for clients", None, None, False),
    ("/api/v1/handshake", "post", "Device handshake: a signed authorization or an error",
     schemas.HandshakeBody, schemas.Authorization, False),
    ("/api/v1/usage", "post", "Usage report, idempotent by reportId", schemas.UsageBody, None, False),
    ("/api/v1/admin/setup", "post", "Set the first admin password", schemas.SetupBody, None, False),
    ("/api/v1/admin/login", "post", "Log in: a bearer token", schemas.LoginBody, None, False),
    ("/api/v1/admin/logout", "post", "End this token", None, None, True),
    ("/api/v1/admin/password", "post", "Change the password (ends every session)", schemas.PasswordChangeBody,
     None, True),
    ("/api/v1/admin/status", "get", "Server status", None, None, True),
    ("/api/v1/admin/handshake-codes", "get", "List handshake codes", None, None, True),
    ("/api/v1/admin/handshake-codes", "post", "Create a handshake code", schemas.CodeCreateBody, None, True),
    ("/api/v1/admin/handshake-codes/{name}", "get", "One handshake code", None, None, True),
    ("/api/v1/admin/handshake-codes/{name}", "patch", "Edit a handshake code", schemas.CodeEditBody, None, True),
    ("/api/v1/admin/handshake-codes/{name}", "delete", "Delete a handshake code (history stays)", None, None, True),
    ("/api/v1/admin/handshake-codes/{name}/usage-order", "put", "Set a custom usage order",
     schemas.UsageOrderBody, None, True),
    ("/api/v1/admin/handshake-codes/{name}/usage-order", "delete", "Back to the default usage order", None, None,
     True),
    ("/api/v1/admin/licenses", "get", "List imported licenses", None, None, True),
    ("/api/v1/admin/licenses", "post", "Upload a license file (raw body)", None, None, True),
    ("/api/v1/admin/licenses/{license_id}", "get", "One license with its file text", None, None, True),
    ("/api/v1/admin/imports", "get", "State of every imported or rejected file", None, None, True),
    ("/api/v1/admin/items", "get", "Items with their live status", None, None, True),
    ("/api/v1/admin/items/{item_id}/revoke", "post", "Revoke an item", None, None, True),
    ("/api/v1/admin/items/{item_id}/restore", "post", "Restore a revoked item", None, None, True),
    ("/api/v1/admin/items/{item_id}/devices", "get", "Devices holding seats on an item", None, None, True),
    ("/api/v1/admin/items/{item_id}/devices/{client_uuid}", "delete", "Force-release a seat", None, None, True),
    ("/api/v1/admin/stats/codes/{code}", "get", "Statistics of a handshake code", None, None, True),
    ("/api/v1/admin/stats/items/{item_id}", "get", "Statistics and status of an item", None, None, True),
    ("/api/v1/admin/events", "get", "Export the usage-event log (NDJSON, or CSV with Accept: text/csv)", None,
     None, True),
    ("/api/v1/admin/alerts", "get", "Alert settings: recipients, webhooks, conditions, SMTP", None, None, True),
    ("/api/v1/admin/alerts/recipients", "get", "E-mail recipients of alerts", None, None, True),
    ("/api/v1/admin/alerts/recipients", "put", "Set the recipients (separated by semicolons)",
     alerts.RecipientsBody, None, True),
    ("/api/v1/admin/alerts/webhooks", "get", "Alert webhooks", None, None, True),
    ("/api/v1/admin/alerts/webhooks", "post", "Add a webhook; its signing secret is in this answer only",
     alerts.WebhookBody, None, True),
    ("/api/v1/admin/alerts/webhooks/{webhook_id}", "delete", "Remove a webhook", None, None, True),
    ("/api/v1/admin/alerts/conditions", "get", "Which conditions alert", None, None, True),
    ("/api/v1/admin/alerts/conditions", "put", "Switch conditions on or off", None, None, True),
    ("/api/v1/admin/alerts/test", "post", "Send a test notification to every recipient and webhook", None, None,
     True),
    ("/api/v1/admin/alerts/check", "post", "Check the alert conditions now", None, None, True),
    ("/api/v1/admin/alerts/open", "get", "Conditions met at the last check", None, None, True),
    ("/api/v1/admin/alerts/history", "get", "Sent alerts, newest first, with each delivery's state", None, None,
     True),
    ("/metrics", "get", "Prometheus metrics (text format)", None, None, False),
]


@cache
def document() -> dict:
    types = sorted({t for r in ROUTES for t in (r[3], r[4]) if t is not None}, key=lambda t: t.__name__)
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    by_type = dict(zip(types, refs))
    paths: dict[str, dict] = {}
    for path, method, summary, request, response, admin in ROUTES:
        op: dict = {"summary": summary, "responses": {
            "200": {"description": "OK", "content": {"application/json": {
                "schema": by_type[response] if response else {"type": "object"}}}},
            "400": {"description": "Malformed request", "content": {"application/json": {"schema": ERROR}}},
        }}
        if request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": by_type[request]}}}
        if path == "/api/v1/admin/licenses" and method == "post":
            op["requestBody"] = {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}}
        if admin:
            op["security"] = ADMIN
            op["responses"]["401"] = {"description": "Missing or expired token"}
            op["responses"]["403"] = {"description": "Setup required"}
        if path == "/api/v1/handshake":
            op["responses"]["403"] = {"description": "Refused: a licensing error code",
                                      "content": {"application/json": {"schema": ERROR}}}
        params = [part[1:-1] for part in path.split("/") if part.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                for p in params]
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "lts-server", "version": lts_server.__version__},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


async def handler(request: web.Request) -> web.Response:
    return web.json_response(document())
