"""The seat queue across the nodes of a PostgreSQL cluster: one order, every node's waiters known to all.

No cluster-wide lock: each waiting request takes a ticket from one database sequence (its place in the
cluster-wide order), its node writes a row to `seat_queue` and tells the others with NOTIFY (delivered
at commit); a node that frees a seat of an item others wait for tells them too. Each node keeps the
others' waiters in its own queue (lts_server/queue.py, as `remote` waiters), holds seats back for them
like for its own, and serves its own only when one of them is the first due a free seat; the node of
the first waiter learns of the free seat (NOTIFY room, then its change feed) and serves it.

A node that stops leaves its rows; they end at their deadline (at most [queue] max_wait_s), and every
node forgets them then. A node whose listening connection drops reads the rows again.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg

from lts_server import logs
from lts_server.queue import SeatQueue, Waiter
from lts_server.store.postgres import PostgresStore

CHANNEL = "lts_seat_queue"


def _wall_ms() -> int:
    return int(time.time() * 1000)


class PgQueueFeed:
    def __init__(self, store: PostgresStore, queue: SeatQueue, on_room: Callable[[set[str]], None],
                 on_change: Callable[[], None]) -> None:
        self.store = store
        self.queue = queue
        self.node = uuid.uuid4().hex[:16]
        self._on_room = on_room  # another node freed seats of these items
        self._on_change = on_change  # another node's waiter left: one here may be first now
        self._listener: asyncpg.Connection | None = None
        self._ops: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._listen()
        self._worker = asyncio.create_task(self._work(), name="seat-queue-feed")

    async def close(self) -> None:
        if self._worker is not None:
            await self._ops.join()
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._listener is not None and not self._listener.is_closed():
            await self._listener.close()

    async def _listen(self) -> None:
        """Listen, then read the other nodes' waiters (a row written meanwhile is told twice: harmless)."""
        conn = await self.store.connect()
        await conn.add_listener(CHANNEL, self._heard)
        self._listener = conn
        for waiter in list(self.queue.remote.values()):
            self.queue.remove(waiter)
        rows = await conn.fetch("SELECT seq, node, code, items, expires_ms FROM seat_queue WHERE expires_ms > $1",
                                _wall_ms())
        for r in rows:
            if r["node"] != self.node:
                self._add_remote(r["seq"], r["node"], r["code"], json.loads(r["items"]), r["expires_ms"])

    async def check(self) -> None:
        """Every second: listen again if the connection dropped."""
        if self._listener is None or self._listener.is_closed():
            try:
                await self._listen()
                self._on_change()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
                logs.event_limited("queue.listen_failed", logs.logging.WARNING, error=str(e))

    async def ticket(self) -> int:
        return await self.store._fetchval("SELECT nextval(pg_get_serial_sequence('seat_queue', 'seq'))")

    # -- told by the ledger, after the commit of the job that made the change ------------------------

    def joined(self, waiter: Waiter) -> None:
        left_ms = max(0, int((waiter.expires - time.monotonic()) * 1000))
        self._ops.put_nowait(("join", (waiter, _wall_ms() + left_ms)))

    def left(self, waiter: Waiter) -> None:
        self._ops.put_nowait(("leave", waiter))

    def room(self, items: set[str]) -> None:
        self._ops.put_nowait(("room", sorted(items)))

    async def _work(self) -> None:
        """Write and tell in the order things happened (a leave never overtakes its join)."""
        while True:
            op, arg = await self._ops.get()
            try:
                await self._apply(op, arg)
            except Exception as e:  # the database is away: the others see the row late or never (it expires)
                logs.event_limited("queue.feed_failed", logs.logging.WARNING, op=op, error=str(e))
            finally:
                self._ops.task_done()

    async def _apply(self, op: str, arg: Any) -> None:
        pool = self.store.pool
        async with pool.acquire() as conn, conn.transaction():
            if op == "join":
                waiter, expires_ms = arg
                await conn.execute("INSERT INTO seat_queue (seq, node, code, items, expires_ms) VALUES ($1,$2,$3,$4,$5)"
                                   " ON CONFLICT (seq) DO NOTHING", waiter.ticket, self.node, waiter.code,
                                   json.dumps(list(waiter.items)), expires_ms)
                payload = {"op": "join", "seq": waiter.ticket, "node": self.node, "code": waiter.code,
                           "items": list(waiter.items), "expires": expires_ms}
            elif op == "leave":
                await conn.execute("DELETE FROM seat_queue WHERE seq = $1", arg.ticket)
                # Rows of nodes that stopped end at their deadline: whoever comes by clears them.
                await conn.execute("DELETE FROM seat_queue WHERE expires_ms < $1", _wall_ms() - 60_000)
                payload = {"op": "leave", "seq": arg.ticket, "node": self.node}
            else:
                payload = {"op": "room", "items": arg, "node": self.node}
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, json.dumps(payload, separators=(",", ":")))

    # -- told by the other nodes -------------------------------------------------------------------------

    def _heard(self, _conn: Any, _pid: int, _channel: str, text: str) -> None:
        try:
            note = json.loads(text)
        except ValueError:
            return
        if note.get("node") == self.node:
            return
        if note["op"] == "join":
            self._add_remote(note["seq"], note["node"], note["code"], note["items"], note["expires"])
        elif note["op"] == "leave":
            waiter = self.queue.remote.get(note["seq"])
            if waiter is not None:
                self.queue.remove(waiter)
                self._on_change()
        elif note["op"] == "room":
            self._on_room(set(note["items"]))

    def _add_remote(self, seq: int, node: str, code: str, items: list[str], expires_ms: int) -> None:
        if seq in self.queue.remote:
            return
        expires = time.monotonic() + (expires_ms - _wall_ms()) / 1000
        self.queue.add(Waiter(seq, code, tuple(items), expires, node=node))
