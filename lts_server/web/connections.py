"""Connection limits: a cap on open connections, and deadlines for clients that send slowly.

aiohttp gives a client unlimited time to send its request head and body, and accepts
connections until the process runs out of file descriptors; a few thousand slow
connections then starve everyone. Every accepted connection passes through a
ConnectionGuard, which wraps aiohttp's protocol and knows what the connection is doing:

- head: connected, or sent the first byte of a request, and the request head is not
  complete yet: at most `header_timeout` seconds;
- body: a handler runs and the request body has not fully arrived: at most
  `body_timeout` seconds from the head;
- busy: the body is in, the handler works: no deadline (the server is the slow one);
- idle: between requests on a keep-alive connection: at most `idle_timeout` seconds.

A connection past its deadline gets 408 (head, body) or is closed (idle). At
`max_connections` a new connection replaces the longest-waiting head or idle
connection; when every connection is sending a body or being served, the new one gets
503 at once. Repeated conditions are logged at most once per interval.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from lts_server import logs

HEAD, BODY, BUSY, IDLE = "head", "body", "busy", "idle"
SWEEP_SECONDS = 0.5
REFUSAL_LINGER_SECONDS = 1.0


@dataclass(frozen=True)
class Limits:
    max_connections: int
    header_timeout: float
    body_timeout: float
    idle_timeout: float


def _response(status: int, reason: str, message: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": {"code": status, "message": message}}).encode()
    retry = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{retry}Connection: close\r\n\r\n").encode() + body


class Guarded(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, with the state and deadline the guard enforces."""

    __slots__ = ("guard", "inner", "transport", "state", "deadline", "request", "closed")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.state = HEAD
        self.deadline = 0.0
        self.request: web.BaseRequest | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.guard.opened(self)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.state == IDLE:
            self.guard.enter(self, HEAD)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.dropped(self)
        self.inner.connection_lost(exc)

    def close(self, answer: bytes = b"") -> None:
        self.guard.dropped(self)
        if self.transport is not None and not self.transport.is_closing():
            if answer:
                self.transport.write(answer)
            self.transport.close()


class _Refused(asyncio.Protocol):
    """A connection over the cap that nothing could make room for: one 503, then closed.

    The request is read and dropped for a moment after the answer: closing a socket with unread
    data makes the kernel send a reset, and the client would see that instead of the 503."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.answer)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(REFUSAL_LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client is done too: close now


class ConnectionGuard:
    """The protocol factory handed to the listening sockets, in front of aiohttp's."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], limits: Limits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.factory = factory
        self.limits = limits
        self.clock = clock
        self.open: dict[Guarded, None] = {}
        # Head and idle connections, longest waiting first: the ones that may make room.
        self.waiting: dict[Guarded, None] = {}
        self.by_handler: dict[asyncio.Protocol, Guarded] = {}
        self.counts = {"refused": 0, "replaced": 0, "timed_out": 0}
        self._busy_answer = _response(
            503, "Service Unavailable", f"too many open connections ({limits.max_connections}, "
            "[server] max_connections): every one is sending a request or being served; retry later", 1)
        self._timeout_answer = _response(408, "Request Timeout", "the request did not arrive in time")

    def __call__(self) -> asyncio.Protocol:
        if len(self.open) >= self.limits.max_connections:
            if not self.waiting:
                self.counts["refused"] += 1
                logs.event_limited("http.connections_full", logs.logging.WARNING,
                                   limit=self.limits.max_connections, refused_total=self.counts["refused"])
                return _Refused(self._busy_answer)
            oldest = next(iter(self.waiting))
            self.counts["replaced"] += 1
            logs.event_limited("http.connection_replaced", logs.logging.WARNING, state=oldest.state,
                               limit=self.limits.max_connections, replaced_total=self.counts["replaced"])
            oldest.close()
        inner = self.factory()
        guarded = Guarded(self, inner)
        self.by_handler[inner] = guarded
        return guarded

    def opened(self, conn: Guarded) -> None:
        self.open[conn] = None
        self.enter(conn, HEAD)

    def dropped(self, conn: Guarded) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.open.pop(conn, None)
        self.waiting.pop(conn, None)
        self.by_handler.pop(conn.inner, None)

    def enter(self, conn: Guarded, state: str) -> None:
        if conn.closed:
            return
        conn.state = state
        now = self.clock()
        limits = self.limits
        self.waiting.pop(conn, None)
        if state == HEAD:
            conn.deadline = now + limits.header_timeout
            self.waiting[conn] = None
        elif state == IDLE:
            conn.deadline = now + limits.idle_timeout
            self.waiting[conn] = None
        elif state == BODY:
            conn.deadline = now + limits.body_timeout
        else:
            conn.deadline = float("inf")

    def sweep(self) -> int:
        """Close the connections past their deadline; returns how many."""
        now = self.clock()
        closed = 0
        for conn in [c for c in self.open if c.deadline <= now]:
            if conn.state == BODY and conn.request is not None and conn.request.content.is_eof():
                self.enter(conn, BUSY)  # the body is in: the rest is the server's time
                continue
            state = conn.state
            conn.close(b"" if state == IDLE else self._timeout_answer)
            closed += 1
            if state != IDLE:
                self.counts["timed_out"] += 1
                logs.event_limited("http.slow_client_closed", state=state, timed_out_total=self.counts["timed_out"])
        return closed

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), timeout=SWEEP_SECONDS)
            except TimeoutError:
                self.sweep()


GUARD = web.AppKey("connection_guard", ConnectionGuard)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_started(request: web.BaseRequest) -> Guarded | None:
    """Tell the guard a request started (body or busy deadline); the connection to hand to request_ended."""
    guard = request.app.get(GUARD)
    conn = guard.by_handler.get(request.protocol) if guard is not None else None
    if conn is not None:
        conn.request = request
        guard.enter(conn, BODY if not request.content.is_eof() else BUSY)
    return conn


def request_ended(conn: Guarded | None) -> None:
    if conn is not None:
        conn.request = None
        conn.guard.enter(conn, IDLE)


@web.middleware
async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the guard when a request starts and ends, so it applies the body and idle deadlines."""
    conn = request_started(request)
    try:
        return await handler(request)
    finally:
        request_ended(conn)


class ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger, but a request it cannot parse (a head over 8 KB, a bad request line,
    a malformed header) is one rate-limited warning line, not an error with a traceback: aiohttp
    already answered 400, and anyone can send such bytes as fast as the log can take them."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})

    def exception(self, msg: object, *args: object, exc_info: object = True, **kw: object) -> None:
        if isinstance(exc_info, HttpProcessingError):
            logs.event_limited("http.bad_request", logs.logging.WARNING, key=f"http.bad_request:{type(exc_info)}",
                               kind=type(exc_info).__name__, error=str(exc_info)[:200])
            return
        super().exception(msg, *args, exc_info=exc_info, **kw)  # type: ignore[arg-type]
