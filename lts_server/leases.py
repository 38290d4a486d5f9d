"""A node of a PostgreSQL cluster: its registration (`cluster_nodes`) and its seat leases.

Each process that opens a PostgreSQL store is one node: it takes a number at
start-up, renews its registration every `cluster.lease_ms` / 4 (database
time), and marks which items are hot for it, so that its claims on them lease
a block of seats along (core/leases.py sizes the block; the rows decide, in
store/sql_leases.py). It gives leased seats back when it no longer claims on
their item (idle), when it stops, and - for a node that died without stopping -
every node sweeps: the leased seats of a node whose registration expired go
back to their items.

Nothing here is needed for correctness: a lease is a row the database checks
on every grant, so a node that lost its lease (swept while it stalled) finds
it gone and claims through the item's row; a seat is never granted twice.
The registration only decides how soon unused seats come back.

The upkeep runs on a thread and event loop of its own, with a connection of
its own, so that a busy event loop (HTTP) does not delay the renewals.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable

import asyncpg

from lts_server import logs
from lts_server.core.leases import ClaimRate, block_size, timings
from lts_server.store import SeatOp, WriteBatch
from lts_server.store.sql_leases import Leasing

NOW_MS = "(extract(epoch from clock_timestamp()) * 1000)::bigint"
# Leases given back, and their seats back on their items' rows: the lease rows are locked first (the
# DELETE), then the items' (the order of every claim, store/sql_leases.py).
_GIVE_BACK = (
    "gone AS ({delete} RETURNING item_id, seats),"
    " total AS (SELECT item_id, SUM(seats) AS seats FROM gone GROUP BY item_id)"
    " UPDATE items SET seats_used = items.seats_used - total.seats FROM total WHERE items.item_id = total.item_id"
)
RETURN_IDLE = "WITH " + _GIVE_BACK.format(
    delete="DELETE FROM seat_leases WHERE node = $1 AND NOT (item_id = ANY($2::text[]))")
# Dead nodes (registration expired) and their leases, and the leases of any node without a registration.
SWEEP = f"WITH dead AS (DELETE FROM cluster_nodes WHERE expires_ms < {NOW_MS} RETURNING node), " + _GIVE_BACK.format(
    delete="DELETE FROM seat_leases WHERE node IN (SELECT node FROM dead) OR node NOT IN (SELECT node FROM cluster_nodes)")


class NodeLeases:
    def __init__(self, lease_ms: int, lease_seats: int) -> None:
        self.lease_ms = lease_ms
        self.lease_seats = lease_seats
        self.renew_s, self.lasts_s, self.idle_s = timings(lease_ms)
        self.node = 0
        self._rate = ClaimRate()
        # Items this node may hold a lease on (a block was asked for since the last idle return).
        self._held: set[str] = set()
        self._guard = threading.Lock()  # the upkeep thread and the writer share the rate and _held

    async def register(self, conn: asyncpg.Connection) -> int:
        """Take this node's number and register it as live."""
        self.node = await conn.fetchval("SELECT nextval('cluster_nodes_node')")
        await self.renew(conn)
        return self.node

    async def renew(self, conn: asyncpg.Connection) -> None:
        # An upsert: a node that stalled past its registration (swept meanwhile) registers again.
        await conn.execute(
            f"INSERT INTO cluster_nodes (node, started_ms, expires_ms, host, pid) VALUES ($1, {NOW_MS},"
            f" {NOW_MS} + $2, $3, $4) ON CONFLICT (node) DO UPDATE SET expires_ms = excluded.expires_ms",
            self.node, int(self.lasts_s * 1000), socket.gethostname(), os.getpid())

    def leasing(self, batch: WriteBatch) -> Leasing:
        """What the batch's leasable claims may lease: a block along with a claim on a hot item."""
        claims = [c.seat.item_id for c in batch.seat_changes if c.op is SeatOp.CLAIM and c.leasable]
        if self.lease_seats <= 0 or not claims:
            return Leasing(self.node)
        now = time.monotonic()
        with self._guard:
            self._rate.add(claims, now)
            blocks = {item: size for item in set(claims)
                      if (size := block_size(self._rate.recent(item, now), self.lease_seats))}
            self._held.update(blocks)
            return Leasing(self.node, blocks, frozenset(self._held))

    async def maintain(self, connect: Callable[[], Awaitable[asyncpg.Connection]], stopping: asyncio.Event) -> None:
        """Every renewal period: renew, give back idle leases, sweep dead nodes; until `stopping`."""
        conn: asyncpg.Connection | None = None
        while not stopping.is_set():
            try:
                if conn is None or conn.is_closed():
                    conn = await connect()
                await self.tick(conn)
            except Exception as e:  # any failure, not only the database away: the upkeep must outlive it
                # (asyncpg raises InternalClientError or ProtocolError too); a dead upkeep would stop renewing
                # this node and sweeping dead ones, and their leased seats would not come back.
                logs.event("cluster.lease_upkeep_failed", logs.logging.WARNING, node=self.node,
                           error=str(e) or type(e).__name__)
                if conn is not None:
                    conn.terminate()
                    conn = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self.renew_s)
        if conn is not None:
            with contextlib.suppress(Exception):
                await self.retire(conn)
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)

    async def tick(self, conn: asyncpg.Connection) -> None:
        await self.renew(conn)
        with self._guard:
            keep = self._rate.busy(time.monotonic(), self.idle_s)
            self._held.intersection_update(keep)
        given = await conn.execute(RETURN_IDLE, self.node, keep)
        swept = await conn.execute(SWEEP)
        if swept != "UPDATE 0":
            logs.event("cluster.dead_node_leases_returned", items=swept.rsplit(" ", 1)[-1], by=self.node)
        if given != "UPDATE 0":
            logs.event("cluster.idle_leases_returned", logs.logging.DEBUG, items=given.rsplit(" ", 1)[-1],
                       node=self.node)

    async def retire(self, conn: asyncpg.Connection) -> None:
        """Stopping: every leased seat back to its item, and this node off the list."""
        async with conn.transaction():
            await conn.execute(RETURN_IDLE, self.node, [])
            await conn.execute("DELETE FROM cluster_nodes WHERE node = $1", self.node)


class Upkeep:
    """NodeLeases.maintain on a thread and event loop of its own."""

    def __init__(self, leases: NodeLeases, connect: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        self._leases = leases
        self._connect = connect
        self._loop = asyncio.new_event_loop()
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lts-leases-{leases.node}", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stopping = asyncio.Event()
        self._ready.set()
        try:
            self._loop.run_until_complete(self._leases.maintain(self._connect, self._stopping))
        finally:
            self._loop.close()

    def stop(self, timeout: float) -> None:
        """Give the leases back and stop (within `timeout` seconds; else other nodes sweep them)."""
        stopping = self._stopping
        if stopping is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended already
                self._loop.call_soon_threadsafe(stopping.set)
        self._thread.join(timeout)
