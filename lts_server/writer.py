"""The writer of server.workers > 1 on SQLite: decides the handshakes the front processes send it.

The writer is the one process that owns the database and the ledger (a whole server, lts_server/server.py,
serving its HTTP on a Unix socket instead of the port). Front processes (lts_server/front.py) send it the
handshakes they validated, in frames (lts_server/writerwire.py), on a second Unix socket in the state folder;
it decides each, commits, and answers with the authorization to sign or the whole refusal. An answer leaves
only after its commit, exactly as in one process: the decision code is the same (web/device.py settle()).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from pathlib import Path
from typing import cast

from aiohttp import web

from lts_server import logs, reportkeys
from lts_server.statelock import StateLock
from lts_server.web import device, metrics
from lts_server.web.errors import error_answer
from lts_server.web.services import Services
from lts_server.writerwire import HEADER, Ask, BadFrame, Reply, decode_asks, frame, frame_length

# The sockets in the state folder: frames of handshakes, and the HTTP of everything else; and the writer's lock.
FRAMES = "writer.sock"
HTTP = "writer-http.sock"
LOCK = "writer.lock"
# Socket addresses are at most 108 bytes (Linux): a longer path is reached through a descriptor of its folder.
MAX_ADDRESS = 100
_GRANTED = web.Response(status=200)
_LOST = Reply(0, 0)
_INTERNAL = b'{"error":{"code":500,"message":"internal error; see the server log"}}'


@functools.cache
def socket_path(state_dir: Path, name: str) -> str:
    """The address of the socket `name` in the state folder, short enough to bind and to connect to."""
    path = str(state_dir / name)
    if len(os.fsencode(path)) < MAX_ADDRESS:
        return path
    folder = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)  # kept open: the address goes through it
    return f"/proc/self/fd/{folder}/{name}"


class _Asked:
    """What error_answer reads of a request, for an ask that came in a frame."""
    path = metrics.HANDSHAKE
    transport = None


class _Front:
    """One front process's connection: replies go back in one frame per turn of the event loop."""

    def __init__(self, stream: asyncio.StreamWriter) -> None:
        self.stream = stream
        self.outbox: list[Reply] = []

    def send(self, reply: Reply) -> None:
        if self.stream.is_closing():
            return  # the front went away: it answered 503 for this ask itself
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self.outbox.append(reply)

    def _flush(self) -> None:
        batch, self.outbox = self.outbox, []
        if not self.stream.is_closing():
            self.stream.write(frame(batch))


class WriterSocket:
    def __init__(self) -> None:
        self.services: Services | None = None
        self._server: asyncio.AbstractServer | None = None
        self._deciding: set[asyncio.Task[None]] = set()
        self._fronts: set[asyncio.StreamWriter] = set()
        self._lock: StateLock | None = None
        self._path: str | None = None

    def claim(self, state_dir: Path) -> None:
        """Take the writer's lock of the state folder, before anything of it is opened: two writers would be
        two ledgers over one database, seats granted twice."""
        self._lock = StateLock(state_dir, LOCK)
        self._lock.exclusive(f"another writer process serves {state_dir} (it holds {self._lock.path}); stop "
                             "that daemon first")

    async def start(self, services: Services, state_dir: Path) -> None:
        """Listen on the state folder's socket for frames (once claimed)."""
        self.services = services
        path = socket_path(state_dir, FRAMES)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a writer that was killed
        self._server = await asyncio.start_unix_server(self._serve, path)
        self._path = path
        os.chmod(path, 0o600)  # the front processes run as the same user; nobody else may ask

    async def close(self, timeout: float) -> None:
        """Stop taking asks; answer those being decided (within timeout), then close the connections."""
        if self._server is not None:
            self._server.close()
        if self._deciding:
            await asyncio.wait(set(self._deciding), timeout=timeout)
        await asyncio.sleep(0)  # the last replies' frame goes out
        for stream in list(self._fronts):
            stream.close()

    def release(self) -> None:
        """Give the writer's lock up: the last thing a stopping writer does, once the database is closed. Its
        socket goes first, while the lock still says no other writer can have bound one there."""
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        if self._lock is not None:
            self._lock.release()

    async def _serve(self, reader: asyncio.StreamReader, stream: asyncio.StreamWriter) -> None:
        front = _Front(stream)
        self._fronts.add(stream)
        try:
            while True:
                header = await reader.readexactly(HEADER.size)
                for ask in decode_asks(await reader.readexactly(frame_length(header))):
                    task = asyncio.ensure_future(self._decide(front, ask))
                    self._deciding.add(task)
                    task.add_done_callback(self._deciding.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front process stopped or was killed
        except BadFrame as e:  # nothing of it was decided: the front reconnects and its asks got 503
            logs.event_limited("writer.bad_frame", logs.logging.ERROR, error=str(e))
        finally:
            self._fronts.discard(stream)
            stream.close()

    async def _decide(self, front: _Front, ask: Ask) -> None:
        assert self.services is not None
        started = time.perf_counter()
        reply = _LOST
        try:
            try:
                reply, response = await self._answer(ask)
            except Exception as e:  # a full or locked database, a stop: the same answer as one process gives
                response = error_answer(cast(web.BaseRequest, _Asked()), e)
                reply = _whole(ask.id, response)
            metrics.count_device(self.services.metrics, metrics.HANDSHAKE, response, time.perf_counter() - started)
        finally:  # every ask is answered, even past a bug here: the front must not wait for ever
            front.send(reply if reply is not _LOST else Reply(ask.id, 500, _INTERNAL))

    async def _answer(self, ask: Ask) -> tuple[Reply, web.Response]:
        services = self.services
        assert services is not None
        if (refused := device.standby_refusal(services)) is not None:
            return _whole(ask.id, refused), refused
        issued = services.ledger.clock()
        if (refused := device.clock_refusal(services, issued)) is not None:
            return _whole(ask.id, refused), refused
        request = ask.decided()
        outcome = await services.ledger.handshake(request, ask.fingerprint)
        settled = device.settle(services, request, outcome, issued)
        if isinstance(settled, web.Response):
            return _whole(ask.id, settled), settled
        assert outcome.report_key is not None
        binding = outcome.binding
        return Reply(ask.id, 200, authorization=settled, report_key=reportkeys.encode_key(outcome.report_key),
                     binding=binding.answer_member if binding is not None else b""), _GRANTED


def _whole(ask_id: int, response: web.Response) -> Reply:
    body = response.body if isinstance(response.body, bytes) else (response.text or "").encode()
    return Reply(ask_id, response.status, body, int(response.headers.get("Retry-After", 0)))
