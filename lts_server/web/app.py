"""The aiohttp application: routes, middlewares and the small public endpoints."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

import lts_server
from lts_server.web import (
    admin,
    alerts,
    auth,
    borrowing,
    connections,
    device,
    holders,
    inputs,
    metrics,
    openapi,
    portal,
    stats,
    trust,
    usage,
)
from lts_server.web.errors import error_answer, errors_middleware
from lts_server.web.portal import alerts as portal_alerts
from lts_server.web.portal import holders as portal_holders
from lts_server.web.schemas import ServerInfo
from lts_server.web.services import SERVICES, Services

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


async def servers(request: web.Request) -> web.Response:
    """The server list for clients; "self" becomes the address this request reached."""
    me = f"{request.scheme}://{request.host}"
    configured = request.app[SERVICES].config.server.servers
    return web.json_response({"servers": [me if s == "self" else s for s in configured]})


def create_app(services: Services, admin_port: int | None = None) -> web.Application:
    """The application; with admin_port set, admin paths answer only on that port."""
    middlewares = [connections.track_requests, portal.security_headers, metrics.device_metrics, errors_middleware,
                   portal.html_errors, inputs.refuse_unstorable_urls]
    if admin_port is not None:
        middlewares.append(_admin_only_on(admin_port))
    middlewares.append(auth.auth_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=CLIENT_MAX_SIZE)
    app[SERVICES] = services
    app[auth.THROTTLE] = auth.Throttle()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/v1/server", server_info)
    device_routes = [app.router.add_post(metrics.HANDSHAKE, device.handshake),
                     app.router.add_post(metrics.USAGE, usage.report_usage),
                     app.router.add_post(borrowing.RETURN, borrowing.return_borrowed)]
    app.router.add_get("/api/v1/servers", servers)
    app.router.add_post("/api/v1/admin/setup", auth.setup)
    app.router.add_post("/api/v1/admin/login", auth.login)
    app.router.add_post("/api/v1/admin/logout", auth.logout)
    app.router.add_post("/api/v1/admin/password", auth.change_password)
    app.router.add_get("/api/v1/admin/status", admin.status)
    app.router.add_get("/api/v1/admin/handshake-codes", admin.list_codes)
    app.router.add_post("/api/v1/admin/handshake-codes", admin.create_code)
    app.router.add_get("/api/v1/admin/handshake-codes/{name}", admin.get_code)
    app.router.add_patch("/api/v1/admin/handshake-codes/{name}", admin.edit_code)
    app.router.add_delete("/api/v1/admin/handshake-codes/{name}", admin.delete_code)
    app.router.add_put("/api/v1/admin/handshake-codes/{name}/usage-order", admin.set_order)
    app.router.add_delete("/api/v1/admin/handshake-codes/{name}/usage-order", admin.reset_order)
    app.router.add_get("/api/v1/admin/licenses", admin.list_licenses)
    app.router.add_post("/api/v1/admin/licenses", admin.upload_license)
    app.router.add_get("/api/v1/admin/licenses/{license_id}", admin.get_license)
    app.router.add_post("/api/v1/admin/licenses/{license_id}/default-code", admin.restore_default_code)
    app.router.add_get("/api/v1/admin/items", admin.list_items)
    app.router.add_post("/api/v1/admin/items/{item_id}/revoke", admin.revoke_item)
    app.router.add_post("/api/v1/admin/items/{item_id}/restore", admin.restore_item)
    app.router.add_get("/api/v1/admin/items/{item_id}/devices", admin.list_devices)
    app.router.add_delete("/api/v1/admin/items/{item_id}/devices/{client_uuid}", admin.release_device)
    app.router.add_get("/api/v1/admin/imports", admin.list_imports)
    app.router.add_post("/api/v1/admin/imports/dismiss", admin.dismiss_import)
    holders.add_routes(app)
    app.router.add_get("/api/v1/admin/events", stats.export_events)
    app.router.add_post("/api/v1/admin/events/archive", stats.archive_events)
    app.router.add_get("/api/v1/admin/events/archives", stats.list_archives)
    app.router.add_get("/api/v1/admin/stats/codes/{code}", stats.code_stats)
    app.router.add_get("/api/v1/admin/stats/items/{item_id}", stats.item_stats)
    app.router.add_get("/api/v1/openapi.json", openapi.handler)
    alerts.add_routes(app)
    trust.add_routes(app)
    app.router.add_get("/metrics", metrics.handler(admin_port))
    portal.add_routes(app)
    portal_alerts.add_routes(app)
    portal_holders.add_routes(app)
    # AppRunner builds its server around app._handle: the device routes go first, past the middlewares.
    app._handle = _device_routes_first(app, device_routes, app._handle)  # type: ignore[method-assign]
    return app


Handle = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _device_routes_first(app: web.Application, routes: list[web.ResourceRoute], handle: Handle) -> Handle:
    """Device POSTs (handshakes, usage reports: nearly all the traffic) in one coroutine instead of the
    middleware stack's eight, doing what the middlewares do for them: the connection guard's request
    states, the device metrics, the JSON errors, the nosniff header (the admin, portal and HTML-error
    middlewares never act on these paths). Everything else, and a request with `Expect:`, takes the
    stack. Measured in docs/design.md ("The handshake hot path").
    """
    matches: dict[str, tuple[UrlMappingMatchInfo, Handle]] = {}
    for route in routes:
        match = UrlMappingMatchInfo({}, route)  # what the router would resolve, once instead of per request
        match.add_app(app)
        match.freeze()
        assert route.resource is not None
        matches[route.resource.canonical] = (match, route.handler)

    async def handle_device_first(request: web.Request) -> web.StreamResponse:
        found = matches.get(request.path) if request.method == hdrs.METH_POST else None
        if found is None or hdrs.EXPECT in request.headers:
            return await handle(request)
        match, handler = found
        request._match_info = match
        conn = connections.request_started(request)
        try:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except Exception as e:
                response = error_answer(request, e)
            metrics.count_device(app[SERVICES].metrics, request.path, response, time.perf_counter() - started)
            response.headers.setdefault(*portal.NOSNIFF)
            return response
        finally:
            connections.request_ended(conn)

    return handle_device_first


def _admin_only_on(admin_port: int):  # noqa: ANN202
    @web.middleware
    async def middleware(request: web.Request, handler):  # noqa: ANN001, ANN202
        path = request.path
        if path.startswith(auth.ADMIN_PREFIX) or path.startswith("/portal") or path == "/metrics" \
                or path in auth.ADMIN_PATHS:
            sockname = request.transport.get_extra_info("sockname") if request.transport else None
            if not sockname or sockname[1] != admin_port:
                raise web.HTTPNotFound(text="not found: the admin API is served on its own address")
        return await handler(request)

    return middleware
