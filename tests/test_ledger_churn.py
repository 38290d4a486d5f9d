"""The ledger under churn: releases and claims in one commit, failed sweeps, conflicts, one seat per code."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from lts_server.core import handshake as hs
from lts_server.core.model import DeploymentType
from lts_server.store import Conflict, SeatOp, StoreError, StoreFull, WriteBatch
from tests.conftest import HELD_SEATS, NOW, Running, item, license_spec


async def seats_in_db(running: Running, item_id: str) -> tuple[set[str], int]:
    holders = {r[0] for r in await running.sql("SELECT client_uuid FROM seats WHERE item_id = ?", item_id)}
    used = await running.sql_value(f"SELECT {HELD_SEATS} FROM items WHERE item_id = ?", item_id)
    return holders, used


def request(client: str, code: str) -> hs.Request:
    return hs.Request(client_uuid=client, product="barcode-reader", deployment_type=DeploymentType.BROWSER,
                      handshake_code=code)


@pytest.fixture
async def two_items(running: Running) -> Running:
    """Item "full" (1 seat, no grace) under code 216998-F, item "other" (10 seats) under 216998-O."""
    await running.drop("f.lic", running.vendor.issue(license_spec("F", items=[item("full", quantity=1)])))
    await running.drop("o.lic", running.vendor.issue(license_spec("O", items=[item("other")])))
    assert (await running.handshake(handshakeCode="216998-F", clientUuid="x"))[0] == 200
    return running


async def in_one_batch(ledger, *jobs, return_exceptions: bool = False):  # noqa: ANN001, ANN002, ANN201
    """Run the ledger jobs in this order in one batch: the writer is held (a barrier) until all are queued
    (a job may first read the database, e.g. the sweep its lapsed seats)."""
    hold, started = asyncio.Event(), asyncio.Event()

    async def held() -> None:
        started.set()
        await hold.wait()

    barrier = asyncio.ensure_future(ledger._barrier(held))
    while not barrier.done() and (ledger.queue_depth or not started.is_set()):
        await asyncio.sleep(0.001)
    tasks = []
    try:
        for job in jobs:
            queued = ledger.queue_depth
            tasks.append(asyncio.ensure_future(job))
            while ledger.queue_depth == queued:
                await asyncio.sleep(0.001)
    finally:
        hold.set()
    await barrier
    return await asyncio.gather(*tasks, return_exceptions=return_exceptions)


async def test_release_and_claim_in_one_commit_on_a_full_item(two_items: Running) -> None:
    ledger = two_items.ledger
    released, claimed, bystander = await in_one_batch(
        ledger,
        ledger.release_seat("full", "x"),
        ledger.handshake(request("y", "216998-F")),
        ledger.handshake(request("z", "216998-O")),
    )
    assert isinstance(claimed.decision, hs.Grant) and claimed.decision.item.item_id == "full"
    assert isinstance(bystander.decision, hs.Grant)
    assert await seats_in_db(two_items, "full") == ({"y"}, 1)
    assert await seats_in_db(two_items, "other") == ({"z"}, 1)


async def test_release_and_reclaim_by_the_same_device_in_one_commit(two_items: Running) -> None:
    ledger = two_items.ledger
    _, again = await in_one_batch(ledger, ledger.release_seat("full", "x"), ledger.handshake(request("x", "216998-F")))
    assert isinstance(again.decision, hs.Grant)
    assert await seats_in_db(two_items, "full") == ({"x"}, 1)


async def test_a_sweep_and_new_devices_in_one_commit(running: Running) -> None:
    await running.drop("d.lic", running.vendor.issue(license_spec("D", items=[
        item("daily", quantity=1, period="daily")])))
    assert (await running.handshake(handshakeCode="216998-D", clientUuid="old"))[0] == 200
    running.clock.advance(days=2)
    freed, new = await in_one_batch(running.ledger, running.ledger.sweep(),
                                    running.ledger.handshake(request("new", "216998-D")))
    assert freed == 1 and isinstance(new.decision, hs.Grant)
    assert await seats_in_db(running, "daily") == ({"new"}, 1)


async def test_churn_over_http_gives_no_5xx(two_items: Running) -> None:
    """Admin releases and new claims on a full item, claims on another item, all at once, for two seconds."""
    running = two_items
    statuses: list[int] = []
    stop = asyncio.get_running_loop().time() + 2

    async def releaser() -> None:
        while asyncio.get_running_loop().time() < stop:
            for client in [s.client_uuid for s in await running.ledger.store.item_seats("full", 100)]:
                url = f"{running.url}/api/v1/admin/items/full/devices/{client}"
                async with running.session.delete(url) as resp:
                    statuses.append(resp.status)

    async def claimer(code: str, prefix: str) -> None:
        n = 0
        while asyncio.get_running_loop().time() < stop:
            n += 1
            statuses.append((await running.handshake(handshakeCode=code, clientUuid=f"{prefix}{n}"))[0])

    await asyncio.gather(releaser(), *(claimer("216998-F", f"f{k}-") for k in range(4)),
                         claimer("216998-O", "o-"))
    assert statuses and not [s for s in statuses if s >= 500]
    holders, used = await seats_in_db(running, "full")
    assert len(holders) == used <= 1
    assert running.ledger.statuses["full"].seats_used == used


async def test_a_failed_sweep_frees_the_seats_on_the_next_sweep(running: Running, monkeypatch) -> None:
    await running.drop("d.lic", running.vendor.issue(license_spec("D", items=[
        item("daily", quantity=1, period="daily")])))
    assert (await running.handshake(handshakeCode="216998-D", clientUuid="old"))[0] == 200
    running.clock.advance(days=2)
    store = running.ledger.store
    real_write = store.write
    calls = 0

    async def full_once(batch: WriteBatch, pipeline: int | None = None) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreFull("injected: disk full")
        await real_write(batch, pipeline)

    monkeypatch.setattr(store, "write", full_once)
    with pytest.raises(StoreFull):
        await running.ledger.sweep()
    assert running.ledger.statuses["daily"].seats_used == 1  # undone: the seat is still held
    assert await running.ledger.sweep() == 1
    assert (await running.handshake(handshakeCode="216998-D", clientUuid="new"))[0] == 200
    assert await seats_in_db(running, "daily") == ({"new"}, 1)


async def test_a_conflict_fails_only_its_own_job(two_items: Running, backend: str, monkeypatch) -> None:
    """On SQLite (one writer) the conflicting job fails; on PostgreSQL (a conflict may be another node's doing)
    it is decided again on the rows re-read, which here still have a free seat."""
    store = two_items.ledger.store
    real_write = store.write
    injected = False

    async def conflict_on_full(batch: WriteBatch, pipeline: int | None = None) -> None:
        nonlocal injected
        claims = [c for c in batch.seat_changes if c.op is SeatOp.CLAIM and c.seat.item_id == "other"]
        if claims and not injected:
            injected = True  # as if another writer had taken the last seat in the database
            raise Conflict("injected conflict", claims[0].job)
        await real_write(batch, pipeline)

    monkeypatch.setattr(store, "write", conflict_on_full)
    ledger = two_items.ledger
    results = await in_one_batch(
        ledger,
        ledger.handshake(request("a", "216998-O")),
        ledger.handshake(request("b", "216998-F")),  # refused (full), recorded as an event
        ledger.release_seat("full", "x"),
        ledger.handshake(request("c", "216998-F")),
        return_exceptions=True,
    )
    assert isinstance(results[1].decision, hs.Refused)
    assert results[2].client_uuid == "x"  # released: the seat freed
    assert isinstance(results[3].decision, hs.Grant)
    assert await seats_in_db(two_items, "full") == ({"c"}, 1)
    if backend == "sqlite":
        assert isinstance(results[0], StoreError)
        assert await seats_in_db(two_items, "other") == (set(), 0)
        assert "other" not in (await ledger.device("a")).seats
    else:
        assert isinstance(results[0].decision, hs.Grant)
        assert await seats_in_db(two_items, "other") == ({"a"}, 1)
        assert "other" in (await ledger.device("a")).seats
    refused = "SELECT COUNT(*) FROM events WHERE type = 'handshake' AND client_uuid = 'b'"
    assert await two_items.sql_value(refused) == 1


# -- one seat per device per code ----------------------------------------------------------


@pytest.fixture
async def ab(running: Running) -> Running:
    """Code 216998-AB over item A (1 seat, daily, expires first) and item B (10 seats, yearly).

    Device x is seated on A, device y on B (A was full).
    """
    await running.drop("ab.lic", running.vendor.issue(license_spec("AB", items=[
        item("A", quantity=1, period="daily", expires_at=NOW + timedelta(days=100)),
        item("B", quantity=10)])))
    assert (await running.handshake(handshakeCode="216998-AB", clientUuid="x"))[1]["authorization"]["itemId"] == "A"
    assert (await running.handshake(handshakeCode="216998-AB", clientUuid="y"))[1]["authorization"]["itemId"] == "B"
    return running


async def _admin_release(running: Running) -> None:
    async with running.session.delete(f"{running.url}/api/v1/admin/items/A/devices/x") as resp:
        assert resp.status == 200


async def _lapse(running: Running) -> None:
    running.clock.advance(days=2)
    assert (await running.handshake(handshakeCode="216998-AB", clientUuid="y"))[0] == 200  # keeps B alive
    assert await running.ledger.sweep() == 1  # x's daily seat on A


async def _renewal_adds_room(running: Running) -> None:
    data = running.vendor.issue(license_spec("AB", revision=2, items=[
        item("A", quantity=3, period="daily", expires_at=NOW + timedelta(days=100)), item("B", quantity=10)]))
    await running.drop("ab.lic", data)
    assert running.ledger.items["A"].quantity == 3


async def _earlier_item_added_to_the_code(running: Running) -> None:
    await running.drop("c.lic", running.vendor.issue(license_spec("C", items=[
        item("C0", quantity=5, expires_at=NOW + timedelta(days=10))])))
    async with running.session.patch(f"{running.url}/api/v1/admin/handshake-codes/216998-AB",
                                   json={"items": ["A", "B", "C0"]}) as resp:
        assert resp.status == 200, await resp.text()


async def _restore_of_a_revoked_item(running: Running) -> None:
    """A revoked earlier item: y would have gone elsewhere; once restored it must not pull y over."""
    await _admin_release(running)
    async with running.session.post(f"{running.url}/api/v1/admin/items/A/revoke") as resp:
        assert resp.status == 200
    assert (await running.handshake(handshakeCode="216998-AB", clientUuid="y"))[1]["authorization"]["itemId"] == "B"
    async with running.session.post(f"{running.url}/api/v1/admin/items/A/restore") as resp:
        assert resp.status == 200


@pytest.mark.parametrize("gain_room", [_admin_release, _lapse, _renewal_adds_room, _earlier_item_added_to_the_code,
                                       _restore_of_a_revoked_item])
async def test_a_seated_device_keeps_its_seat_when_an_earlier_item_gains_room(ab: Running, gain_room) -> None:
    await gain_room(ab)
    status, body = await ab.handshake(handshakeCode="216998-AB", clientUuid="y")
    assert status == 200 and body["authorization"]["itemId"] == "B"
    holding = list((await ab.ledger.device("y")).seats)
    assert holding == ["B"]
    # A device without a seat still follows the usage order.
    status, body = await ab.handshake(handshakeCode="216998-AB", clientUuid="newcomer")
    assert status == 200 and body["authorization"]["itemId"] != "B"


async def test_a_seat_on_an_item_that_no_longer_covers_the_request_does_not_hold_the_device(ab: Running) -> None:
    async with ab.session.post(f"{ab.url}/api/v1/admin/items/B/revoke") as resp:
        assert resp.status == 200
    await _admin_release(ab)
    status, body = await ab.handshake(handshakeCode="216998-AB", clientUuid="y")
    assert status == 200 and body["authorization"]["itemId"] == "A"
