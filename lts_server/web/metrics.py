"""GET /metrics, and the middleware that times and counts device requests.

The middleware reads outcomes from the answers themselves (status, and the
licensing code of a refusal), so the handlers stay free of metrics code.
Where /metrics answers, and to whom, is in the README ("Metrics").
"""

from __future__ import annotations

import hmac
import time

import msgspec
from aiohttp import web

from lts_server.metrics import CONTENT_TYPE, Metrics
from lts_server.web import auth
from lts_server.web.errors import ApiError
from lts_server.web.services import SERVICES, Services

HANDSHAKE = "/api/v1/handshake"
USAGE = "/api/v1/usage"


class _Error(msgspec.Struct):
    code: int = 0


class _ErrorBody(msgspec.Struct):
    error: _Error = msgspec.field(default_factory=_Error)


class _UsageAnswer(msgspec.Struct, rename="camel"):
    duplicate: bool = False
    accepted: int = 0


_error = msgspec.json.Decoder(_ErrorBody)
_usage = msgspec.json.Decoder(_UsageAnswer)


def _outcome(status: int) -> str:
    if status < 300:
        return "granted"
    if status == 403:
        return "refused"
    if status == 503:
        return "unavailable"
    return "invalid" if status < 500 else "error"


def _body(response: web.StreamResponse) -> bytes:
    body = getattr(response, "body", None)
    return body if isinstance(body, bytes) else b"{}"


@web.middleware
async def device_metrics(request: web.Request, handler):  # noqa: ANN001, ANN201
    path = request.path
    if path != HANDSHAKE and path != USAGE:
        return await handler(request)
    started = time.perf_counter()
    response = await handler(request)
    count_device(request.app[SERVICES].metrics, path, response, time.perf_counter() - started)
    return response


def count_device(metrics: Metrics, path: str, response: web.StreamResponse, seconds: float) -> None:
    """Count a device request (a handshake, a usage report, a return) by the outcome its answer shows."""
    if path == HANDSHAKE:
        metrics.handshake_latency.observe(seconds)
        outcome = _outcome(response.status)
        if outcome == "granted":
            metrics.handshakes_granted.inc()
            return
        try:
            code = str(_error.decode(_body(response)).error.code or response.status)
        except msgspec.DecodeError:
            code = str(response.status)
        metrics.handshakes.labels(outcome, code).inc()
    elif path != USAGE:  # a return of a borrowed seat
        metrics.returns.labels(_outcome(response.status)).inc()
    else:
        outcome = {"granted": "accepted"}.get(_outcome(response.status), _outcome(response.status))
        if outcome == "accepted":
            try:
                answer = _usage.decode(_body(response))
            except msgspec.DecodeError:
                answer = _UsageAnswer()
            if answer.duplicate:
                outcome = "duplicate"
            metrics.usage_records.inc(answer.accepted)
        metrics.usage_reports.labels(outcome).inc()


async def _allowed(request: web.Request, services: Services, admin_port: int | None) -> bool:
    cfg = services.config.metrics
    if admin_port is not None or cfg.public:
        return True  # on the admin listener (the admin-only middleware keeps it off the device one), or public
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else ""
    if not bearer:
        return False
    if cfg.token_file:
        expected = services.config.path(cfg.token_file).read_text(encoding="utf-8").strip()
        if expected and hmac.compare_digest(expected.encode(), bearer.encode()):
            return True
    return await auth.live_token(services, bearer) is not None


def handler(admin_port: int | None):  # noqa: ANN201
    async def metrics(request: web.Request) -> web.Response:
        services = request.app[SERVICES]
        if not services.config.metrics.enabled:
            raise ApiError(404, "metrics are switched off ([metrics] enabled = false)")
        if not await _allowed(request, services, admin_port):
            raise ApiError(401, "/metrics needs a bearer token: the one in [metrics] token_file, or an admin token")
        return web.Response(body=services.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    return metrics
