"""A front process of server.workers > 1 on SQLite: serves the port, asks the writer for decisions.

N front processes share the port (SO_REUSEPORT). A handshake is read, validated and decoded here, sent to
the writer (lts_server/writer.py) in a frame with the others of the same moment, and its grant signed and
encoded here: the writer's core only decides and commits. Every other request (usage reports, returns,
handshakes that wait for a seat, the admin API, the portal, /metrics) is passed whole to the writer's own
HTTP on a Unix socket: one process holds the state they read and write, so they answer as in one process.

When the writer is away (killed, restarting) a request gets 503 with Retry-After: those whose ask was sent
may have been committed or not, and the device's retry gets the same seat back (a refresh); no answer is
ever made up here, so nothing is acknowledged that the writer did not commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys

import aiohttp
import msgspec
from aiohttp import hdrs, web
from yarl import URL

import lts_server
from lts_server import identity, logs, signer, writer
from lts_server.config import Config
from lts_server.server import BACKLOG, connection_limits, tls_context
from lts_server.signer import BatchSigner
from lts_server.web import connections, device, metrics
from lts_server.web.app import CLIENT_MAX_SIZE
from lts_server.web.auth import FRONT_PEER
from lts_server.web.connections import GUARD, ConnectionGuard, ProtocolLog
from lts_server.web.errors import error_answer, error_response, json_protocol_errors
from lts_server.web.portal import NOSNIFF
from lts_server.web.schemas import HandshakeBody
from lts_server.writerwire import HEADER, Ask, BadFrame, Reply, decode_replies, frame, frame_length

RECONNECT_SECONDS = 0.1
# Not passed on either way: they describe one connection, not the request (and FRONT_PEER is the front's to set).
HOP_BY_HOP = frozenset(h.lower() for h in (
    hdrs.CONNECTION, hdrs.KEEP_ALIVE, hdrs.TRANSFER_ENCODING, hdrs.TE, hdrs.UPGRADE, hdrs.PROXY_AUTHORIZATION,
    hdrs.PROXY_AUTHENTICATE, hdrs.TRAILER, hdrs.CONTENT_LENGTH, hdrs.EXPECT, FRONT_PEER))
_encoder = msgspec.json.Encoder()


class WriterGone(Exception):
    """The writer is not connected, or went away before it answered."""


def writer_gone(method: str = "POST") -> web.Response:
    """503 while the writer restarts; a request that changes something may or may not have been recorded."""
    maybe = (" (what was asked may or may not have been recorded: a grant's retry gets the same seat, a usage "
             "report's is known by its reportId)") if method not in ("GET", "HEAD") else ""
    return error_response(503, f"the server's writer process is restarting; retry{maybe}",
                          headers={"Retry-After": "1"})


class WriterLink:
    """The front's connection to the writer: asks leave in one frame per turn of the loop, replies come by id."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stream: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._outbox: list[Ask] = []
        self._ids = itertools.count(1)

    async def run(self, stopping: asyncio.Event) -> None:
        """Stay connected to the writer until stopping: reconnect whenever it goes away."""
        lost = False
        while not stopping.is_set():
            try:
                reader, stream = await asyncio.open_unix_connection(self.path)
            except OSError:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), RECONNECT_SECONDS)
                continue
            if lost:
                logs.event("front.writer_reconnected")
            self._stream = stream
            try:
                await self._read(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                logs.event("front.writer_lost", logs.logging.WARNING, error=str(e) or type(e).__name__,
                           in_flight=len(self._pending))
            except BadFrame as e:
                logs.event("front.bad_frame", logs.logging.ERROR, error=str(e), in_flight=len(self._pending))
            finally:
                lost = True
                self._stream = None
                stream.close()
                self._fail_pending()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            header = await reader.readexactly(HEADER.size)
            for reply in decode_replies(await reader.readexactly(frame_length(header))):
                future = self._pending.pop(reply.id, None)
                if future is not None and not future.done():
                    future.set_result(reply)

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(WriterGone())

    async def ask(self, request: HandshakeBody, fingerprint: str | None) -> Reply:
        if self._stream is None or self._stream.is_closing():
            raise WriterGone()
        loop = asyncio.get_running_loop()
        ask_id = next(self._ids)
        future: asyncio.Future[Reply] = loop.create_future()
        self._pending[ask_id] = future
        if not self._outbox:
            loop.call_soon(self._flush)
        self._outbox.append(Ask(ask_id, request, fingerprint))
        try:
            return await future
        finally:
            self._pending.pop(ask_id, None)

    def _flush(self) -> None:
        batch, self._outbox = self._outbox, []
        if self._stream is None or self._stream.is_closing():
            for ask in batch:
                future = self._pending.pop(ask.id, None)
                if future is not None and not future.done():
                    future.set_exception(WriterGone())
            return
        self._stream.write(frame(batch))


class Front:
    def __init__(self, cfg: Config, worker: int) -> None:
        self.config = cfg
        self.worker = worker
        ident = identity.load_or_create(cfg.state_dir)  # the writer made it before any front started
        self.key_id = ident.key_id
        self.signer = BatchSigner(ident.signing_key, signer.use_thread(cfg.server.workers, cfg.storage.backend))
        self.link = WriterLink(writer.socket_path(cfg.state_dir, writer.FRAMES))
        self.stopping = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None
        self._listeners: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.urls: list[str] = []

    async def start(self) -> None:
        cfg = self.config
        # No cookie jar: the session carries many clients' requests, never one's cookies to another. Idle
        # connections are dropped well before the writer's idle_timeout would close one as it is reused.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(writer.socket_path(cfg.state_dir, writer.HTTP), limit=0,
                                            keepalive_timeout=cfg.server.idle_timeout / 2),
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=(hdrs.USER_AGENT, hdrs.ACCEPT_ENCODING, hdrs.ACCEPT, hdrs.CONTENT_TYPE),
            timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application(middlewares=[connections.track_requests], client_max_size=CLIENT_MAX_SIZE)
        app.router.add_post(metrics.HANDSHAKE, self.handshake)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        runner = self.runner = web.AppRunner(app, shutdown_timeout=cfg.server.shutdown_timeout, access_log=None,
                                             logger=ProtocolLog())
        guard = ConnectionGuard(lambda: json_protocol_errors(runner.server()), connection_limits(cfg))
        app[GUARD] = guard
        await runner.setup()
        self._tasks.append(asyncio.create_task(self.link.run(self.stopping), name="writer-link"))
        self._tasks.append(asyncio.create_task(guard.run(self.stopping), name="connection-guard"))
        listener = await asyncio.get_running_loop().create_server(guard, cfg.server.host, cfg.server.port,
                                                                  ssl=tls_context(cfg), reuse_address=True,
                                                                  reuse_port=True, backlog=BACKLOG)
        self._listeners.append(listener)
        scheme = "https" if cfg.server.tls_cert else "http"
        self.urls = [f"{scheme}://{cfg.server.host}:{cfg.server.port}"]

    async def handshake(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await device.read_json_body(request)
            parsed, fingerprint = device.parse_body(body)
            if parsed.wait_seconds:  # it waits in the writer's seat queue
                return await self.forward(request, body)
            if parsed.device_fingerprint is not None or parsed.wait_seconds is not None:
                # The fingerprint's hash travels instead; a wait of 0 is no wait.
                parsed = msgspec.structs.replace(parsed, device_fingerprint=None, wait_seconds=None)
            reply = await self.link.ask(parsed, fingerprint)
        except WriterGone:
            return writer_gone()
        except Exception as e:
            response = error_answer(request, e)
            response.headers.setdefault(*NOSNIFF)
            return response
        if reply.status != 200 or reply.authorization is None:
            headers = {**device.JSON, NOSNIFF[0]: NOSNIFF[1]}
            if reply.retry_after:
                headers["Retry-After"] = str(reply.retry_after)
            return web.Response(status=reply.status, body=reply.body, headers=headers)
        response = await device.signed_answer(self.signer, self.key_id, _encoder.encode(reply.authorization),
                                              reply.report_key, reply.binding)
        response.headers.setdefault(*NOSNIFF)
        return response

    async def forward(self, request: web.Request, body: bytes | None = None) -> web.StreamResponse:
        """Pass the request to the writer's HTTP and its answer back, streamed (an event export is long)."""
        assert self.session is not None
        if body is None:
            body = await request.read()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        headers.append((FRONT_PEER, request.remote or ""))  # the writer's login throttle counts by it
        response: web.StreamResponse | None = None
        try:
            async with self.session.request(request.method, URL(f"http://writer{request.raw_path}", encoded=True),
                                            headers=headers, data=body,
                                            allow_redirects=False) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for key, value in upstream.headers.items():
                    if key.lower() not in HOP_BY_HOP or key.lower() == "content-length":
                        response.headers.add(key, value)
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError):
            if response is not None and response.prepared:
                raise ConnectionResetError("the writer went away mid-answer") from None
            return writer_gone(request.method)

    async def stop(self) -> None:
        self.stopping.set()
        for listener in self._listeners:
            listener.close()
        if self.runner is not None:  # requests in flight finish: their asks are answered first
            await self.runner.cleanup()
        self.link.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()


async def run(cfg: Config, worker: int) -> int:
    front = Front(cfg, worker)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(logs.loop_exception_handler)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # a reload is the writer's: it holds the config's state
    try:
        await front.start()
    except (OSError, ValueError) as e:
        print(f"lts-server: front process {worker} cannot start: {e}", file=sys.stderr)
        await front.stop()
        return 1
    print(f"lts-server {lts_server.__version__} front {worker} listening on {', '.join(front.urls)}", flush=True)
    await stop.wait()
    await front.stop()
    return 0
