"""lts-client against lts-server itself, in this process: borrowing across re-handshakes, waiting for a seat.

They need the server installed and its test helpers (a checkout of lts-server, pytest run from its root);
elsewhere they are skipped, except under CI (CI=true), where a missing server fails the run.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

try:
    import lts_server  # noqa: F401
    import tests.conftest  # noqa: F401
except ImportError as missing:
    if os.environ.get("CI") == "true":  # as tests/conftest.py's unavailable(): under CI nothing may skip
        raise
    pytest.skip(f"these tests run the client against lts-server and its test helpers (tests/conftest.py): "
                f"{missing}; run pytest from the root of an lts-server checkout", allow_module_level=True)

from lts_server import config as config_mod  # noqa: E402 - after the skip above
from lts_server.server import Server  # noqa: E402
from tests.conftest import Clock, admin_login, item, license_spec, make_vendor, wait_for, write_config  # noqa: E402

from lts_client import LicenseRefused, LtsClient  # noqa: E402

CODE = "216998-L1"
# A laptop that borrows a seat of item "lend" (borrowMaxDays 14) for a trip.
LAPTOP = {"handshake_code": CODE, "client_uuid": "laptop", "product": "barcode-reader", "deployment_type": "browser"}
# Item "seat" has one seat, for product "viewer": a second device waits for it.
VIEWER = {"handshake_code": CODE, "product": "viewer", "deployment_type": "browser"}


@dataclass
class Served:
    server: Server
    url: str
    clock: Clock
    token: str

    def seats_used(self, item_id: str) -> int:
        assert self.server.services is not None
        return self.server.services.ledger.status(item_id).seats_used

    def waiting(self, item_id: str) -> int:
        assert self.server.services is not None
        return self.server.services.ledger.queue.waiting(item_id)

    async def release(self, item_id: str, client_uuid: str) -> None:
        """What the admin does with DELETE /api/v1/admin/items/{id}/devices/{clientUuid}."""
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"}) as session:
            async with session.delete(f"{self.url}/api/v1/admin/items/{item_id}/devices/{client_uuid}") as resp:
                assert resp.status == 200, await resp.text()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    vendor = make_vendor(tmp_path / "vendor")
    folder = tmp_path / "server"
    cfg = config_mod.load(write_config(folder, vendor), environ={})
    (folder / "import" / "a.lic").write_bytes(vendor.issue(license_spec("L1", items=[
        item("lend", quantity=5, borrow_max_days=14),
        item("seat", quantity=1, product="viewer"),
    ])))
    clock = Clock()
    server = Server(cfg, clock=clock)
    await server.start()
    try:
        assert server.services is not None
        await server.services.importer.scan("test")
        url = server.urls[0]
        yield Served(server, url, clock, await admin_login(url))
    finally:
        await server.stop()


def client(served: Served, cache: Path, **kw: Any) -> LtsClient:
    return LtsClient([served.url], cache_dir=cache, device_fingerprint=None, **kw)


# -- borrowing across re-handshakes ------------------------------------------------------------


@pytest.mark.parametrize(("later", "use_cache"), [(timedelta(seconds=1), False), (timedelta(hours=2), True)],
                         ids=["use_cache=False", "past refreshBy"])
async def test_after_a_re_handshake_borrowed_lists_the_borrow_once_and_the_readme_loop_returns_it(
        served: Served, tmp_path: Path, later: timedelta, use_cache: bool) -> None:
    """The device borrows, then asks again with the same fields (at once without the cache, or back online past
    refreshBy): the server keeps the borrow under a new authorization and report key."""
    async with client(served, tmp_path / "cache") as c:
        lent = await c.borrow(**LAPTOP, days=7)
        served.clock.advance(seconds=later.total_seconds())  # the server's clock is the test's
        again = await c.handshake(**LAPTOP, now=served.clock.now, use_cache=use_cache)
        assert again.authorization_id != lent.authorization_id and again.report_key != lent.report_key
        assert again.borrowed_until == lent.borrowed_until
        [listed] = c.borrowed(now=served.clock.now)
        assert listed.authorization_id == again.authorization_id
        for borrowed in c.borrowed(now=served.clock.now):  # the README's loop
            assert (await c.return_borrowed(borrowed))["released"] is True
        assert c.borrowed(now=served.clock.now) == []
        assert served.seats_used("lend") == 0
        # A repeat is harmless: the server answers that nothing was held.
        repeat = await c.return_borrowed(listed)
        assert repeat["returned"] is True and repeat["released"] is False
    async with client(served, tmp_path / "cache") as restarted:
        assert restarted.borrowed(now=served.clock.now) == []


async def test_the_authorization_borrow_gave_returns_the_borrow_after_a_re_handshake(
        served: Served, tmp_path: Path) -> None:
    """README: `auth = await client.borrow(...)` ... `await client.return_borrowed(auth)`, with a handshake between:
    the return is signed with the newest report key, the only one the server takes."""
    async with client(served, tmp_path / "cache") as c:
        lent = await c.borrow(**LAPTOP, days=7)
        served.clock.advance(seconds=1)
        await c.handshake(**LAPTOP, now=served.clock.now, use_cache=False)
        assert (await c.return_borrowed(lent))["released"] is True
        assert c.borrowed(now=served.clock.now) == []
    assert served.seats_used("lend") == 0


async def test_a_borrow_the_server_ended_leaves_borrowed_at_the_next_answer(served: Served, tmp_path: Path) -> None:
    """The admin releases the borrowed seat; the device's next handshake gets a seat that is not borrowed."""
    async with client(served, tmp_path / "cache") as c:
        await c.borrow(**LAPTOP, days=7)
        await served.release("lend", "laptop")
        served.clock.advance(hours=2)
        fresh = await c.handshake(**LAPTOP, now=served.clock.now)
        assert fresh.borrowed_until is None
        assert c.borrowed(now=served.clock.now) == []


async def test_an_answer_for_other_request_fields_supersedes_the_cached_borrow(served: Served, tmp_path: Path) -> None:
    """The app was updated between the borrow and the next handshake (another `version`): the cache holds one
    answer per code, item and device, the newest."""
    async with client(served, tmp_path / "cache") as c:
        await c.borrow(**LAPTOP, days=7, version="2.0")
        served.clock.advance(hours=2)
        again = await c.handshake(**LAPTOP, version="2.1", now=served.clock.now)
        [listed] = c.borrowed(now=served.clock.now)
        assert listed.authorization_id == again.authorization_id
        await served.release("lend", "laptop")
        served.clock.advance(hours=2)
        assert (await c.handshake(**LAPTOP, version="2.1", now=served.clock.now)).borrowed_until is None
        assert c.borrowed(now=served.clock.now) == []


# -- waiting for a seat (waitSeconds) ------------------------------------------------------------


async def test_a_wait_longer_than_the_timeout_gets_the_seat_freed_later(served: Served, tmp_path: Path) -> None:
    async with client(served, tmp_path / "holder") as holder:
        await holder.handshake(**VIEWER, client_uuid="holder")
    async with client(served, tmp_path / "cache", timeout=1) as c:
        started = time.monotonic()
        waiting = asyncio.ensure_future(c.handshake(**VIEWER, client_uuid="waiter", wait_seconds=20))
        await wait_for(lambda: served.waiting("seat") == 1)
        await asyncio.sleep(2)  # past the client's 1 s timeout: the request is still in the queue
        assert served.waiting("seat") == 1
        await served.release("seat", "holder")
        auth = await asyncio.wait_for(waiting, 10)
        assert time.monotonic() - started > 2
        assert auth.fields["clientUuid"] == "waiter" and auth.fields["itemId"] == "seat"
        assert c.failover.backoff(served.url) == 0


async def test_a_wait_that_runs_out_is_the_servers_refusal_with_the_queue_position(
        served: Served, tmp_path: Path) -> None:
    async with client(served, tmp_path / "holder") as holder:
        await holder.handshake(**VIEWER, client_uuid="holder")
    async with client(served, tmp_path / "cache", timeout=1) as c:
        started = time.monotonic()
        with pytest.raises(LicenseRefused) as refused:
            await c.handshake(**VIEWER, client_uuid="waiter", wait_seconds=2)
        assert time.monotonic() - started >= 1.9
        assert (refused.value.status, refused.value.code) == (403, 120)
        assert refused.value.details["queuePosition"] == 1
        assert c.failover.backoff(served.url) == 0  # the server answered: it is not marked failed
    assert served.waiting("seat") == 0
