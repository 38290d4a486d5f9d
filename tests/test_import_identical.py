"""Identical content imported again changes and records nothing, whatever the order of its items and
after any restart, on both backends (the database lists items by id, a file in its own order)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lts_server import config as config_mod
from lts_server.server import Server
from tests.conftest import Vendor, admin_login, item, license_spec, query, storage_section, write_config

Start = Callable[[], Awaitable[tuple[Server, aiohttp.ClientSession]]]


@pytest.fixture
async def restartable(request: pytest.FixtureRequest, backend: str, tmp_path: Path,
                      vendor: Vendor) -> AsyncIterator[Start]:
    """Starts the same server (same database) as often as asked; the previous one is stopped first."""
    storage = await storage_section(request, backend, tmp_path)
    config = write_config(tmp_path, vendor, storage=storage)
    live: list[tuple[Server, aiohttp.ClientSession]] = []

    async def stop() -> None:
        while live:
            server, session = live.pop()
            await session.close()
            await server.stop()

    async def start() -> tuple[Server, aiohttp.ClientSession]:
        await stop()
        server = Server(config_mod.load(config, environ={}))
        await server.start()
        token = await admin_login(server.urls[0])
        live.append((server, aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})))
        return live[-1]

    yield start
    await stop()


async def _upload(server: Server, session: aiohttp.ClientSession, name: str, data: bytes) -> tuple[int, Any]:
    async with session.post(f"{server.urls[0]}/api/v1/admin/licenses?name={name}", data=data) as resp:
        return resp.status, await resp.json()


async def _events(server: Server) -> list[tuple[Any, ...]]:
    assert server.services is not None
    return await query(server.services.store, "SELECT seq, type FROM events ORDER BY seq")


async def test_identical_bytes_with_items_out_of_order_are_unchanged_after_a_restart(
        restartable: Start, vendor: Vendor) -> None:
    data = vendor.issue(license_spec("R", items=[item("r-c"), item("r-a", "per-scan", quantity=500), item("r-b")]))
    server, session = await restartable()
    status, answer = await _upload(server, session, "r.lic", data)
    assert (status, answer["state"]) == (201, "imported"), answer
    before = await _events(server)
    for restart in range(2):
        server, session = await restartable()
        for name in ("r.lic", "again.lic"):  # the same name, and another
            status, answer = await _upload(server, session, name, data)
            assert (status, answer["state"], answer["reason"]) == (200, "unchanged", None), (restart, answer)
        assert await _events(server) == before  # nothing recorded
    assert [i for i in server.services.ledger.codes["216998-R"].items] == ["r-c", "r-a", "r-b"]


async def test_a_renewal_that_no_longer_lists_an_item_imported_again_is_unchanged(
        restartable: Start, vendor: Vendor) -> None:
    first = vendor.issue(license_spec("K", items=[item("k-2"), item("k-1")]))
    renewal = vendor.issue(license_spec("K", revision=2, items=[item("k-2", quantity=20)]))
    server, session = await restartable()
    assert (await _upload(server, session, "k1.lic", first))[1]["state"] == "imported"
    assert (await _upload(server, session, "k2.lic", renewal))[1]["state"] == "renewed"
    before = await _events(server)
    status, answer = await _upload(server, session, "k2.lic", renewal)  # the renewal kept k-1: same content
    assert (status, answer["state"]) == (200, "unchanged"), answer
    server, session = await restartable()
    status, answer = await _upload(server, session, "k2-again.lic", renewal)
    assert (status, answer["state"]) == (200, "unchanged"), answer
    assert await _events(server) == before
    assert sorted(server.services.ledger.licenses["K"].license.items, key=lambda i: i.item_id)[0].quantity == 10
    # Another file of the same revision with other content is still refused.
    other = vendor.issue(license_spec("K", revision=2, items=[item("k-2", quantity=30)]))
    status, answer = await _upload(server, session, "k2-other.lic", other)
    assert status == 422 and answer["reason"].startswith("stale-revision"), answer
