"""Seat queues through HTTP: waitSeconds, first in first out, timeouts with the position, a full queue,
disconnects, a stopping server, and one order across the nodes of a PostgreSQL cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lts_server import config as config_mod
from lts_server.server import Server
from tests.conftest import (
    Clock,
    Vendor,
    admin_login,
    item,
    license_spec,
    query,
    storage_section,
    wait_for,
    write_config,
)

CODE = "216998-L1"


@asynccontextmanager
async def serving(request: pytest.FixtureRequest, backend: str, folder: Path, vendor: Vendor, quantity: int = 1,
                  storage: dict[str, Any] | None = None, **sections: dict[str, Any]) -> AsyncIterator[Node]:
    storage = storage or await storage_section(request, backend, folder)
    cfg = config_mod.load(write_config(folder, vendor, storage=storage, **sections), environ={})
    server = Server(cfg, clock=Clock())
    await server.start()
    node = Node(server, server.urls[0])
    try:
        if not list((folder / "import").glob("*.lic")):
            (folder / "import" / "a.lic").write_bytes(vendor.issue(license_spec("L1", items=[
                item("seat", quantity=quantity)])))
        assert server.services is not None
        await server.services.importer.scan("test")
        node.token = await admin_login(node.url)
        yield node
    finally:
        await server.stop()


class Node:
    def __init__(self, server: Server, url: str) -> None:
        self.server = server
        self.url = url
        self.token = ""

    @property
    def ledger(self):  # noqa: ANN201
        assert self.server.services is not None
        return self.server.services.ledger

    async def handshake(self, client: str, **body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            async with s.post(f"{self.url}/api/v1/handshake", json={
                    "handshakeCode": CODE, "clientUuid": client, "product": "barcode-reader",
                    "deploymentType": "browser", **body}) as resp:
                return resp.status, await resp.json(), dict(resp.headers)

    async def release(self, client: str, item_id: str = "seat") -> None:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"}) as s:
            async with s.delete(f"{self.url}/api/v1/admin/items/{item_id}/devices/{client}") as resp:
                assert resp.status == 200, await resp.text()

    async def metrics(self) -> str:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"}) as s:
            async with s.get(f"{self.url}/metrics") as resp:
                return await resp.text()


async def queued(node: Node, n: int) -> None:
    await wait_for(lambda: node.ledger.queue.waiting("seat") == n)


async def join(node: Node, client: str, seconds: int = 30) -> asyncio.Task[tuple[int, dict, dict]]:
    """Start a waiting handshake and return once it is in the queue."""
    before = node.ledger.queue.waiting("seat")
    task = asyncio.ensure_future(node.handshake(client, waitSeconds=seconds))
    await queued(node, before + 1)
    return task


async def test_waiters_get_freed_seats_first_in_first_out(request: pytest.FixtureRequest, backend: str,
                                                          tmp_path: Path, vendor: Vendor) -> None:
    async with serving(request, backend, tmp_path, vendor) as node:
        assert (await node.handshake("holder"))[0] == 200
        waiters = [await join(node, f"w{i}") for i in range(3)]
        # A newcomer that does not wait is refused at once: the next seat is the queue's.
        status, out, _ = await node.handshake("newcomer")
        assert status == 403 and out["error"]["code"] == 120
        order = []
        holder = "holder"
        for _ in range(3):
            await node.release(holder)
            done, _ = await asyncio.wait(waiters, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1
            [task] = done
            status, answer, _ = task.result()
            assert status == 200, answer
            holder = answer["authorization"]["clientUuid"]
            order.append(holder)
            waiters.remove(task)
        assert order == ["w0", "w1", "w2"]
        assert node.ledger.status("seat").seats_used == 1
        assert node.ledger.queue.waiting("seat") == 0


async def test_a_waiter_whose_time_runs_out_gets_the_refusal_and_its_position(
        request: pytest.FixtureRequest, backend: str, tmp_path: Path, vendor: Vendor) -> None:
    async with serving(request, backend, tmp_path, vendor) as node:
        await node.handshake("holder")
        first = await join(node, "w0", seconds=30)
        started = time.monotonic()
        status, out, _ = await node.handshake("w1", waitSeconds=1)
        assert 0.9 < time.monotonic() - started < 5
        assert status == 403 and out["error"]["code"] == 120 and out["error"]["sdkCode"] == -20120
        assert out["error"]["queuePosition"] == 2 and "position 2" in out["error"]["message"]
        assert node.ledger.queue.waiting("seat") == 1
        # One refused handshake event for the request that waited, with its position.
        assert node.server.services is not None
        refused = await query(node.server.services.store, "SELECT client_uuid, result, detail FROM events"
                              " WHERE type = 'handshake' AND client_uuid = 'w1'")
        assert [(c, r) for c, r, _ in refused] == [("w1", 120)] and '"queuePosition":2' in refused[0][2]
        first.cancel()


async def test_a_full_queue_refuses_at_once(request: pytest.FixtureRequest, backend: str, tmp_path: Path,
                                            vendor: Vendor) -> None:
    async with serving(request, backend, tmp_path, vendor, queue={"max_waiting": 2}) as node:
        await node.handshake("holder")
        waiters = [await join(node, "w0"), await join(node, "w1")]
        started = time.monotonic()
        status, out, _ = await node.handshake("w2", waitSeconds=30)
        assert time.monotonic() - started < 2
        assert status == 403 and out["error"]["code"] == 120 and out["error"]["queueFull"] is True
        assert "queue" in out["error"]["message"] and "2 waiting" in out["error"]["message"]
        for w in waiters:
            w.cancel()


async def test_wait_seconds_over_the_maximum_is_400(request: pytest.FixtureRequest, backend: str, tmp_path: Path,
                                                    vendor: Vendor) -> None:
    async with serving(request, backend, tmp_path, vendor, queue={"max_wait_s": 60}) as node:
        status, out, _ = await node.handshake("w", waitSeconds=61)
        assert status == 400 and out["error"]["field"] == "waitSeconds" and "60" in out["error"]["message"]
        status, out, _ = await node.handshake("w", waitSeconds=-1)
        assert status == 400 and out["error"]["field"] == "waitSeconds"
        # With a free seat, waiting costs nothing: granted at once.
        assert (await node.handshake("w", waitSeconds=60))[0] == 200


async def test_a_client_that_disconnects_leaves_the_queue(request: pytest.FixtureRequest, backend: str,
                                                          tmp_path: Path, vendor: Vendor) -> None:
    async with serving(request, backend, tmp_path, vendor) as node:
        await node.handshake("holder")
        leaving = await join(node, "gone")
        staying = await join(node, "stays")
        assert "lts_item_queue_waiting{item=\"seat\"} 2.0" in await node.metrics()
        leaving.cancel()  # the client closes its connection
        await queued(node, 1)
        await node.release("holder")
        status, answer, _ = await staying
        assert status == 200 and answer["authorization"]["clientUuid"] == "stays"
        assert "lts_item_queue_waiting{item=\"seat\"} 0.0" in await node.metrics()


async def test_a_stopping_server_answers_waiters_503(request: pytest.FixtureRequest, backend: str, tmp_path: Path,
                                                     vendor: Vendor) -> None:
    storage = await storage_section(request, backend, tmp_path)
    async with serving(request, backend, tmp_path, vendor, storage=storage) as node:
        await node.handshake("holder")
        waiter = await join(node, "w0")
        stopping = asyncio.ensure_future(node.server.stop())
        status, out, headers = await asyncio.wait_for(waiter, 10)
        await stopping
        assert status == 503 and "Retry-After" in headers
    # Nothing was lost: after the restart the holder still holds the one seat and the waiter none.
    async with serving(request, backend, tmp_path, vendor, storage=storage) as node:
        assert node.ledger.status("seat").seats_used == 1
        assert (await node.handshake("holder"))[0] == 200
        assert (await node.handshake("w0"))[0] == 403


async def test_one_order_across_the_nodes_of_a_cluster(request: pytest.FixtureRequest, tmp_path: Path,
                                                       vendor: Vendor, pg_server: Any) -> None:
    backend = "postgresql"
    storage = {"state_dir": str(tmp_path / "a" / "state"), "backend": backend, "url": await pg_server.new_database(),
               "follow_ms": 50}
    (tmp_path / "b").mkdir()
    async with serving(request, backend, tmp_path / "a", vendor, storage=storage) as a:
        storage_b = {**storage, "state_dir": str(tmp_path / "b" / "state")}
        async with serving(request, backend, tmp_path / "b", vendor, storage=storage_b) as b:
            await a.server.catch_up()
            await b.server.catch_up()
            assert (await a.handshake("holder"))[0] == 200
            nodes = [a, b, a, b]
            waiters = []
            for i, node in enumerate(nodes):
                waiters.append(asyncio.ensure_future(node.handshake(f"w{i}", waitSeconds=60)))
                # Each node knows every waiter, its own and the other's.
                await wait_for(lambda: all(n.ledger.queue.waiting("seat") == i + 1 for n in (a, b)))
            holder, order = "holder", []
            for turn in range(4):
                releaser = b if turn % 2 == 0 else a
                await releaser.release(holder)
                done, _ = await asyncio.wait(waiters, timeout=15, return_when=asyncio.FIRST_COMPLETED)
                assert len(done) == 1, f"turn {turn}: {len(done)} answers"
                [task] = done
                status, answer, _ = task.result()
                assert status == 200, answer
                holder = answer["authorization"]["clientUuid"]
                order.append(holder)
                waiters.remove(task)
            assert order == ["w0", "w1", "w2", "w3"]
            await wait_for(lambda: a.ledger.queue.waiting("seat") == 0 == b.ledger.queue.waiting("seat"))
