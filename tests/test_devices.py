"""Devices held in memory only while in use (lts_server/devices.py): the database holds every device's rows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from lts_server import config as config_mod
from lts_server.devices import DeviceCache
from lts_server.server import Server
from lts_server.store import AuthorizationRecord, Seat, StoreUnavailable
from tests.conftest import NOW, Clock, Running, Vendor, admin_login, item, license_spec, storage_section, write_config


class Rows:
    """A database of device rows that counts the lookups made against it."""

    def __init__(self, seats: list[Seat] = ()) -> None:
        self.seats = list(seats)
        self.lookups: list[set[str]] = []
        self.fail: Exception | None = None

    async def __call__(self, clients: set[str]) -> tuple[list[Seat], list[AuthorizationRecord], dict[str, str]]:
        self.lookups.append(set(clients))
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        return [s for s in self.seats if s.client_uuid in clients], [], {}


def seat(client: str, item_id: str = "i") -> Seat:
    return Seat(item_id, client, NOW, NOW, NOW + timedelta(days=1))


async def test_misses_in_one_loop_turn_share_one_lookup() -> None:
    rows = Rows([seat("a"), seat("b")])
    cache = DeviceCache(rows, capacity=100)
    await asyncio.gather(*(cache.load([c]) for c in ("a", "b", "c", "a", "b")))
    assert rows.lookups == [{"a", "b", "c"}]
    assert list(cache.get("a").seats) == ["i"] and not cache.get("c").seats
    await cache.load(["a", "c"])  # in memory now: no lookup
    assert len(rows.lookups) == 1 and (cache.hits, cache.misses) == (2, 3)


async def test_the_least_recently_used_unpinned_device_is_evicted() -> None:
    cache = DeviceCache(Rows(), capacity=2)
    await cache.pin(["held"])
    await cache.load(["a"])
    await cache.load(["b"])  # over capacity: "a" goes, "held" is pinned
    assert "held" in cache and "a" not in cache and "b" in cache
    await cache.load(["c"])
    assert "held" in cache and "b" not in cache
    cache.unpin(["held"])
    await cache.load(["d"])
    assert "held" not in cache and len(cache) == 2


async def test_a_failed_lookup_fails_its_waiters_and_the_next_load_reads_again() -> None:
    rows = Rows([seat("a")])
    cache = DeviceCache(rows, capacity=10)
    rows.fail = StoreUnavailable("database is locked")
    results = await asyncio.gather(cache.pin(["a"]), cache.load(["a"]), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert "a" not in cache
    rows.fail = None
    await cache.pin(["a"])
    cache.unpin(["a"])  # the failed pin left no pin behind: evictable again
    assert cache.get("a").seats["i"] == seat("a") and len(rows.lookups) == 2


@pytest.fixture
async def small_cache(backend: str, request: pytest.FixtureRequest, tmp_path: Path,
                      vendor: Vendor) -> AsyncIterator[Running]:
    """A server that keeps at most 1,000 devices in memory, with two items of 5,000 seats in one code."""
    clock = Clock()
    storage = {**await storage_section(request, backend, tmp_path), "device_cache": 1000}
    cfg = config_mod.load(write_config(tmp_path, vendor, storage=storage), environ={})
    server = Server(cfg, clock=clock)
    await server.start()
    token = await admin_login(server.urls[0])
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        running = Running(server, server.urls[0], tmp_path, vendor, session, clock)
        await running.drop("big.lic", vendor.issue(license_spec("BIG", items=[
            item("first", quantity=5000, period="daily"), item("second", quantity=5000, period="daily")])))
        yield running
    await running.server.stop()  # the one running now: a test may have restarted it


async def test_devices_read_back_from_the_database_keep_their_one_seat(small_cache: Running) -> None:
    running = small_cache

    async def ask(client: str) -> tuple[int, dict]:
        return await running.handshake(handshakeCode="216998-BIG", clientUuid=client)

    for start in range(0, 1200, 100):
        answers = await asyncio.gather(*(ask(f"d{n}") for n in range(start, start + 100)))
        assert {status for status, _ in answers} == {200}
    assert len(running.ledger.devices) <= 1000
    # The first devices left memory; asking again, each refreshes the seat it holds instead of taking another.
    running.clock.advance(hours=1)
    for n in range(50):
        status, body = await ask(f"d{n}")
        assert status == 200 and body["authorization"]["seats"]["used"] == 1200
    assert await running.sql_value("SELECT COUNT(*) FROM seats") == 1200
    assert await running.sql_value("SELECT COUNT(*) FROM seats WHERE refreshed_ms > granted_ms") == 50
    assert running.ledger.status("first").seats_used == 1200
    # Admin release of a device not in memory, then it asks again: one new seat.
    evicted = next(f"d{n}" for n in range(1200) if f"d{n}" not in running.ledger.devices)
    async with running.session.delete(f"{running.url}/api/v1/admin/items/first/devices/{evicted}") as resp:
        assert resp.status == 200
    assert running.ledger.status("first").seats_used == 1199
    status, body = await ask(evicted)
    assert status == 200 and body["authorization"]["seats"]["used"] == 1200


async def test_after_a_restart_nothing_is_in_memory_and_lapsed_seats_are_still_swept(small_cache: Running) -> None:
    running = small_cache
    for n in range(20):
        assert (await running.handshake(handshakeCode="216998-BIG", clientUuid=f"d{n}"))[0] == 200
    await running.server.stop()
    cfg = running.server.config
    running.server = Server(cfg, clock=running.clock)
    await running.server.start()
    running.url = running.server.urls[0]
    assert len(running.ledger.devices) == 0 and running.ledger.status("first").seats_used == 20
    status, body = await running.handshake(handshakeCode="216998-BIG", clientUuid="d3")
    assert status == 200 and body["authorization"]["seats"]["used"] == 20
    running.clock.advance(days=2)
    assert await running.ledger.sweep() == 20
    assert running.ledger.status("first").seats_used == 0
    assert await running.sql_value("SELECT COUNT(*) FROM seats") == 0


async def test_the_device_list_of_an_item_is_paged(small_cache: Running) -> None:
    running = small_cache
    for n in range(5):
        assert (await running.handshake(handshakeCode="216998-BIG", clientUuid=f"d{n}"))[0] == 200
        running.clock.advance(seconds=1)
    url = f"{running.url}/api/v1/admin/items/first/devices"
    async with running.session.get(url, params={"limit": "2", "offset": "2"}) as resp:
        page = await resp.json()
    assert page["total"] == 5 and page["next"] == 4 and [d["clientUuid"] for d in page["devices"]] == ["d2", "d3"]
    async with running.session.get(url, params={"offset": "4"}) as resp:
        last = await resp.json()
    assert last["next"] is None and [d["clientUuid"] for d in last["devices"]] == ["d4"]
    async with running.session.get(url, params={"limit": "5"}) as resp:
        assert (await resp.json())["next"] is None  # a full last page: nothing after it
    async with running.session.get(url, params={"limit": "0"}) as resp:
        assert resp.status == 400 and "limit" in (await resp.json())["error"]["message"]


async def test_live_concurrent_grants_are_read_at_start_up(small_cache: Running) -> None:
    """An overused concurrent item grants only its quantity across devices: the grants of devices that are
    not in memory still count after a restart."""
    running = small_cache
    await running.drop("conc.lic", running.vendor.issue(license_spec("C", items=[
        item("conc", "per-concurrent-device", quantity=1)])))
    assert (await running.handshake(handshakeCode="216998-C", clientUuid="first"))[0] == 200
    # As the rollups record it once the overuse allowance (1000 x 1) is used up.
    await running.sql("UPDATE items SET overuse_used = 1000, overused = 1 WHERE item_id = 'conc'")
    await running.server.stop()
    running.server = Server(running.server.config, clock=running.clock)
    await running.server.start()
    running.url = running.server.urls[0]
    assert "first" not in running.ledger.devices
    status, body = await running.handshake(handshakeCode="216998-C", clientUuid="second")
    assert status == 403 and body["error"]["code"] == 120 and "1 of 1 devices" in body["error"]["message"]
