"""The portal where the admin sets issue 25's keys: a code's borrowing limit and seat limits, and the items
page showing borrowing terms, version ranges, code limits and the seat queue."""

from __future__ import annotations

import asyncio
import html
import re

import aiohttp

from tests.conftest import Running, item, license_spec, wait_for
from tests.test_portal import csrf, portal_session

TEAM = "216998-team"


async def test_the_code_form_sets_borrowing_and_seat_limits(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[
        item("pool", quantity=10, borrow_max_days=14, versions=">=3.0,<5"),
        item("scan", "per-scan", quantity=100, product="scanner")])))
    s = await portal_session(running)
    try:
        async with s.get(running.url + "/portal/codes/new") as resp:
            page = await resp.text()
        assert 'name="borrowMaxDays"' in page and 'name="reservedSeats.pool"' in page
        assert 'name="reservedSeats.scan"' not in page  # only seat items take limits
        form = aiohttp.FormData({"csrf": csrf(page), "organizationId": "216998", "custom": "team",
                                 "borrowMaxDays": "5", "reservedSeats.pool": "4", "maxSeats.pool": "6"})
        form.add_field("items", "pool")
        async with s.post(running.url + "/portal/codes/new", data=form) as resp:
            assert "created" in await resp.text()
        code = running.ledger.codes[TEAM]
        assert code.borrow_max_days == 5
        assert [(lim.item_id, lim.reserved_seats, lim.max_seats) for lim in code.seat_limits] == [("pool", 4, 6)]
        async with s.get(running.url + f"/portal/codes/{TEAM}/edit") as resp:
            page = await resp.text()
        assert 'value="5"' in page and 'value="4"' in page and 'value="6"' in page
        # Over the quantity: refused with the reason, nothing changed.
        form = aiohttp.FormData({"csrf": csrf(page), "custom": "team", "borrowMaxDays": "",
                                 "reservedSeats.pool": "11"})
        form.add_field("items", "pool")
        async with s.post(running.url + f"/portal/codes/{TEAM}/edit", data=form) as resp:
            text = html.unescape(await resp.text())
        assert "Not saved: itemLimits.pool.reservedSeats: reservations on item pool would total 11" in text, text
        assert 'name="reservedSeats.pool" type="number" min="0" max="10" value="11"' in text  # as typed
        form = aiohttp.FormData({"csrf": csrf(page), "custom": "team", "borrowMaxDays": "lots"})
        form.add_field("items", "pool")
        async with s.post(running.url + f"/portal/codes/{TEAM}/edit", data=form) as resp:
            assert resp.status == 400 and "not a whole number" in html.unescape(await resp.text())
        assert running.ledger.codes[TEAM].seat_limits[0].reserved_seats == 4
        form = aiohttp.FormData({"csrf": csrf(page), "custom": "team", "borrowMaxDays": ""})
        form.add_field("items", "pool")
        async with s.post(running.url + f"/portal/codes/{TEAM}/edit", data=form) as resp:
            assert "saved" in await resp.text()
        assert running.ledger.codes[TEAM].borrow_max_days is None and running.ledger.codes[TEAM].seat_limits == ()
    finally:
        await s.close()


async def test_the_items_page_shows_terms_limits_and_the_queue(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[
        item("pool", quantity=1, borrow_max_days=14, versions=">=3.0,<5")])))
    assert (await running.handshake(handshakeCode="216998-L1", clientUuid="holder", version="4.0"))[0] == 200
    waiter = asyncio.ensure_future(running.handshake(handshakeCode="216998-L1", clientUuid="w", version="4.0",
                                                     waitSeconds=30))
    await wait_for(lambda: running.ledger.queue.waiting("pool") == 1)
    s = await portal_session(running)
    try:
        async with s.get(running.url + "/portal/items") as resp:
            page = html.unescape(await resp.text())
        assert "versions >=3.0,<5" in page and "borrow up to 14 days" in page and "1 waiting" in page
    finally:
        await s.close()
        waiter.cancel()


async def test_the_holders_page_says_a_seat_is_borrowed_and_its_release_keeps_the_device_working(
        running: Running) -> None:
    """README: releasing a borrowed seat frees it at once, the offline device keeps working until borrowedUntil
    ("the answer, ltsctl and the portal say so")."""
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[
        item("pool", quantity=2, borrow_max_days=14)])))
    status, answer = await running.handshake(handshakeCode="216998-L1", clientUuid="trip", borrowDays=7)
    assert status == 200, answer
    until = answer["authorization"]["borrowedUntil"][:19].replace("T", " ")
    assert (await running.handshake(handshakeCode="216998-L1", clientUuid="desk"))[0] == 200
    s = await portal_session(running)
    try:
        async with s.get(running.url + "/portal/items/pool/holders") as resp:
            page = html.unescape(await resp.text())
        assert f"borrowed until {until}" in re.sub(r"<[^>]+>", "", page)
        assert "keeps working with its signed authorization" in page  # the borrowed row's confirmation
        assert page.count("borrowed until") == 1  # the desk's seat is not borrowed
        async with s.post(running.url + "/portal/items/pool/holders/trip/release",
                          data={"csrf": csrf(page)}) as resp:
            text = html.unescape(await resp.text())
        assert "Released trip from item pool" in text and "keeps working with its signed authorization" in text
        async with s.post(running.url + "/portal/items/pool/holders/desk/release",
                          data={"csrf": csrf(page)}) as resp:
            text = html.unescape(await resp.text())
        assert "Released desk from item pool" in text and "Note:" not in text
    finally:
        await s.close()
