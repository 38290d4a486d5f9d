"""Borrowing, queueing and reservations never oversell: 600 devices on 100 + 10% seats, sampled throughout.

A third of the devices borrow, a third come through a code with 20 reserved seats, all wait in the queue;
meanwhile borrowed seats are returned and others force-released, so the queue keeps moving. A sampler
reads the database over and over: the seats held never pass 110, the item's counter always equals the
seat rows, and once full the item stays full: a freed seat goes to the head of the queue in the same commit
that frees it, so the only seats ever free are the team's unused reserved ones (no plain device may take
them, and no team device may be waiting then).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sqlite3
import threading
from typing import Any

import aiohttp
import asyncpg

from lts_client import MAC_HEADER, report_mac
from lts_server.store.postgres import PostgresStore
from lts_server.store.sqlite import SQLiteStore
from tests.conftest import Running, item, license_spec

DEFAULT = "216998-L1"
TEAM = "216998-team"
DEVICES = 600
RELEASES = 150
SAMPLE = ("SELECT (SELECT COUNT(*) FROM seats WHERE item_id = 'pool'),"
          " (SELECT seats_used FROM items WHERE item_id = 'pool'),"
          " (SELECT seats_reserved_unused FROM items WHERE item_id = 'pool')")


class Sampler:
    """Reads (seat rows, counter) from the database as fast as it can until stopped."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.samples: list[tuple[int, int, int]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        if isinstance(self.store, SQLiteStore):
            halt = threading.Event()
            worker = asyncio.to_thread(self._sqlite, halt)
            task = asyncio.ensure_future(worker)
            await self.stop.wait()
            halt.set()
            await task
        else:
            assert isinstance(self.store, PostgresStore)
            conn = await asyncpg.connect(self.store.url)
            try:
                while not self.stop.is_set():
                    self.samples.append(tuple(await conn.fetchrow(SAMPLE)))  # type: ignore[arg-type]
                    await asyncio.sleep(0.002)
            finally:
                await conn.close()

    def _sqlite(self, halt: threading.Event) -> None:
        con = sqlite3.connect(self.store.path)
        try:
            while not halt.is_set():
                self.samples.append(con.execute(SAMPLE).fetchone())
                halt.wait(0.001)
        finally:
            con.close()


async def test_600_devices_never_more_than_110_seats(running: Running) -> None:
    r = running
    await r.drop("a.lic", r.vendor.issue(license_spec("L1", items=[
        item("pool", quantity=100, period="daily", borrow_max_days=7)])))
    async with r.session.post(f"{r.url}/api/v1/admin/handshake-codes", json={
            "organizationId": "216998", "custom": "team", "items": ["pool"],
            "itemLimits": {"pool": {"reservedSeats": 20}}}) as resp:
        assert resp.status == 201
    assert r.server.services is not None
    sampler = Sampler(r.server.services.store)
    sampling = asyncio.ensure_future(sampler.run())
    holders: dict[str, dict[str, Any]] = {}  # client -> answer, of the devices holding a seat now
    outcomes: list[tuple[str, int, dict[str, Any]]] = []
    rng = random.Random(25)

    async def device(s: aiohttp.ClientSession, n: int) -> None:
        kind = ("borrow", "team", "plain")[n % 3]
        body: dict[str, Any] = {"clientUuid": f"d{n}", "product": "barcode-reader", "deploymentType": "browser",
                                "handshakeCode": TEAM if kind == "team" else DEFAULT, "waitSeconds": 20}
        if kind == "borrow":
            body["borrowDays"] = 3
        async with s.post(f"{r.url}/api/v1/handshake", json=body) as resp:
            answer = await resp.json()
        outcomes.append((kind, resp.status, answer))
        if resp.status == 200:
            holders[body["clientUuid"]] = answer

    async def all_waiting() -> None:
        """Until every device that found no seat waits: a release before then may find nobody to serve."""
        while True:
            async with r.session.get(f"{r.url}/api/v1/admin/items") as resp:
                [pool] = [i for i in (await resp.json())["items"] if i["itemId"] == "pool"]
            if pool.get("waiting", 0) == DEVICES - 110:
                return
            await asyncio.sleep(0.02)

    async def release_some(s: aiohttp.ClientSession) -> int:
        await all_waiting()
        released = 0
        while released < RELEASES:
            await asyncio.sleep(0.02)
            if len(holders) < 110:
                continue
            client = rng.choice(sorted(holders))
            answer = holders.pop(client)
            auth = answer["authorization"]
            if auth.get("borrowedUntil"):  # the device returns its borrowed seat itself
                data = json.dumps({"clientUuid": client, "handshakeCode": auth["handshakeCode"]}).encode()
                mac = report_mac(base64.b64decode(answer["reportKey"]), data)
                async with s.post(f"{r.url}/api/v1/handshake/return", data=data,
                                  headers={"Content-Type": "application/json", MAC_HEADER: mac}) as resp:
                    assert resp.status == 200 and (await resp.json())["released"], await resp.text()
            else:
                async with r.session.delete(f"{r.url}/api/v1/admin/items/pool/devices/{client}") as resp:
                    assert resp.status == 200, await resp.text()
            released += 1
        return released

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as s:
        releases = asyncio.ensure_future(release_some(s))
        await asyncio.gather(*(device(s, n) for n in range(DEVICES)))
        assert await releases == RELEASES
    sampler.stop.set()
    await sampling

    granted = [o for o in outcomes if o[1] == 200]
    refused = [o for o in outcomes if o[1] != 200]
    assert len(granted) == 110 + RELEASES
    assert all(status == 403 and a["error"]["code"] == 120 and a["error"]["queuePosition"] >= 1
               for _, status, a in refused), refused[:3]
    assert {k for k, _, _ in granted} == {"borrow", "team", "plain"}
    samples = sampler.samples
    assert len(samples) > 100, len(samples)
    assert all(rows == counter <= 110 for rows, counter, _ in samples), max(samples)
    full = next(i for i, (rows, _, _) in enumerate(samples) if rows == 110)
    # Full from then on: while devices wait, no moment shows a free seat but a reserved one.
    free = {(110 - rows, reserved) for rows, _, reserved in samples[full:] if rows < 110}
    assert all(seats <= reserved for seats, reserved in free), sorted(free)
    assert await r.sql_value("SELECT COUNT(*) FROM seats WHERE item_id = 'pool'") == 110
    team_seats = await r.sql_value("SELECT COUNT(*) FROM seats WHERE item_id = 'pool' AND code = ?", TEAM)
    assert team_seats >= 20
    assert await r.sql_value("SELECT seats_used FROM code_item_limits WHERE code_name = ?", TEAM) == team_seats
    assert r.ledger.queue.waiting("pool") == 0
