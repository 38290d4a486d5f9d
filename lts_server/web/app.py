"""The aiohttp application: routes, middlewares and the small public endpoints."""

from __future__ import annotations

from aiohttp import web

import lts_server
from lts_server.core.times import iso
from lts_server.web import device, stats, usage
from lts_server.web.errors import errors_middleware
from lts_server.web.schemas import ServerInfo
from lts_server.web.services import SERVICES, Services

import msgspec

# Admin uploads carry license files (up to 1 MiB); device bodies are capped
# lower by their handlers.
CLIENT_MAX_SIZE = 2 * 1024 * 1024


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if await services.store.ready():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready", "reason": "database not open or not migrated"}, status=503)


async def server_info(request: web.Request) -> web.Response:
    ident = request.app[SERVICES].identity
    info = ServerInfo(ident.server_uuid, lts_server.__version__, ident.key_id, ident.public_key_b64)
    return web.Response(body=msgspec.json.encode(info), content_type="application/json")


async def list_imports(request: web.Request) -> web.Response:
    ledger = request.app[SERVICES].ledger
    files = [
        {
            "path": r.path,
            "state": r.state,
            "reason": r.reason,
            "sha256": r.sha256,
            "licenseId": r.license_id,
            "revision": r.revision,
            "seenAt": iso(r.seen_at),
        }
        for r in sorted(ledger.imports.values(), key=lambda r: r.path)
    ]
    return web.json_response({"files": files})


def create_app(services: Services) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=CLIENT_MAX_SIZE)
    app[SERVICES] = services
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/v1/server", server_info)
    app.router.add_post("/api/v1/handshake", device.handshake)
    app.router.add_post("/api/v1/usage", usage.report_usage)
    app.router.add_get("/api/v1/admin/imports", list_imports)
    app.router.add_get("/api/v1/admin/events", stats.export_events)
    app.router.add_get("/api/v1/admin/stats/codes/{code}", stats.code_stats)
    app.router.add_get("/api/v1/admin/stats/items/{item_id}", stats.item_stats)
    return app
