"""Borrowing (offline checkout) through HTTP: borrowDays, borrowedUntil, returns, limits, statistics, restarts."""

from __future__ import annotations

import base64
import json
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lts_client import MAC_HEADER, report_mac
from lts_server import config as config_mod
from lts_server.core.times import parse_iso, to_ms
from lts_server.core.usage import SLICE_MS, bucket_start
from lts_server.server import Server
from tests.conftest import Clock, Running, Vendor, admin_login, item, license_spec, query_database, write_config

CODE = "216998-L1"


@pytest.fixture
async def lend(running: Running) -> Running:
    v = running.vendor
    await running.drop("a.lic", v.issue(license_spec("L1", items=[
        item("dev", quantity=10, period="daily", borrow_max_days=14),
        item("conc", "per-concurrent-device", quantity=3, product="viewer", borrow_max_days=30),
        item("scan", "per-scan", quantity=1000, product="scanner"),
        item("plain", quantity=5, product="plain"),
    ])))
    return running


async def borrow(r: Running, client: str, days: Any, product: str = "barcode-reader", **kw: Any) -> tuple[int, dict]:
    return await r.handshake(handshakeCode=CODE, clientUuid=client, product=product, borrowDays=days, **kw)


async def give_back(r: Running, client: str, code: str = CODE, mac: str | None = None) -> tuple[int, dict]:
    body = json.dumps({"clientUuid": client, "handshakeCode": code}).encode()
    key = r.report_keys.get((code, client))
    headers = {"Content-Type": "application/json"}
    if mac is not None:
        headers[MAC_HEADER] = mac
    elif key is not None:
        headers[MAC_HEADER] = report_mac(base64.b64decode(key), body)
    async with r.session.post(f"{r.url}/api/v1/handshake/return", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def devices(r: Running, item_id: str) -> dict:
    async with r.session.get(f"{r.url}/api/v1/admin/items/{item_id}/devices") as resp:
        assert resp.status == 200
        return await resp.json()


async def test_borrow_holds_the_seat_and_the_authorization_until_borrowed_until(lend: Running) -> None:
    status, answer = await borrow(lend, "laptop", 7)
    assert status == 200, answer
    auth = answer["authorization"]
    until = parse_iso(auth["borrowedUntil"])
    assert abs((until - lend.clock.now) - timedelta(days=7)) < timedelta(seconds=2)
    # A daily item's authorization would last a day: the borrowed one lasts the borrow.
    assert parse_iso(auth["expiresAt"]) == until
    listing = await devices(lend, "dev")
    assert listing["borrowed"] == 1
    [seat] = listing["devices"]
    assert seat["clientUuid"] == "laptop" and seat["borrowed"] is True and seat["code"] == CODE
    assert parse_iso(seat["borrowedUntil"]) == until and parse_iso(seat["expiresAt"]) >= until
    # The sweeper does not free it after the daily period: only at borrowedUntil.
    lend.clock.advance(days=3)
    assert await lend.ledger.sweep() == 0
    assert await lend.sql_value("SELECT COUNT(*) FROM seats WHERE item_id = 'dev'") == 1
    lend.clock.advance(days=4, seconds=1)
    assert await lend.ledger.sweep() == 1
    assert await lend.sql_value("SELECT COUNT(*) FROM seats WHERE item_id = 'dev'") == 0


async def test_coming_back_online_keeps_the_borrow(lend: Running) -> None:
    _, first = await borrow(lend, "laptop", 10)
    status, again = await lend.handshake(handshakeCode=CODE, clientUuid="laptop")
    assert status == 200
    assert again["authorization"]["borrowedUntil"] == first["authorization"]["borrowedUntil"]
    assert again["authorization"]["expiresAt"] == first["authorization"]["expiresAt"]


async def test_return_frees_the_seat_and_is_idempotent(lend: Running) -> None:
    await borrow(lend, "laptop", 7)
    status, out = await give_back(lend, "laptop")
    assert status == 200, out
    assert out["returned"] is True and out["released"] is True and out["itemId"] == "dev"
    assert (await devices(lend, "dev"))["total"] == 0
    assert lend.ledger.status("dev").seats_used == 0
    again = await give_back(lend, "laptop")
    assert again[0] == 200 and again[1]["released"] is False and again[1]["returned"] is True
    assert lend.ledger.status("dev").seats_used == 0
    released = [r for r in await lend.sql("SELECT detail FROM events WHERE type = 'seat.released'")]
    assert len(released) == 1 and json.loads(released[0][0])["reason"] == "returned"


async def test_return_must_be_signed_by_the_device(lend: Running) -> None:
    await borrow(lend, "laptop", 7)
    body = json.dumps({"clientUuid": "laptop", "handshakeCode": CODE}).encode()
    async with lend.session.post(f"{lend.url}/api/v1/handshake/return", data=body,
                                 headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 401
    assert (await give_back(lend, "laptop", mac=report_mac(b"x" * 32, body)))[0] == 403
    assert lend.ledger.status("dev").seats_used == 1
    # A device that holds nothing on the code has nothing to return: done, nothing changed.
    status, out = await give_back(lend, "stranger")
    assert status == 200 and out["returned"] is True and out["released"] is False and out["itemId"] is None, out
    assert lend.ledger.status("dev").seats_used == 1
    status, out = await give_back(lend, "laptop", code="216998-nope")
    assert status == 403 and out["error"]["code"] == 101, out


async def test_return_of_a_seat_that_is_not_borrowed_is_refused(lend: Running) -> None:
    await lend.handshake(handshakeCode=CODE, clientUuid="desk")
    status, out = await give_back(lend, "desk")
    assert status == 409 and "not borrowed" in out["error"]["message"]
    assert lend.ledger.status("dev").seats_used == 1
    # A concurrent item holds no seat for a grant that is not borrowed: nothing to give back either.
    await lend.handshake(handshakeCode=CODE, clientUuid="viewer-1", product="viewer")
    status, out = await give_back(lend, "viewer-1")
    assert status == 409 and "not borrowed" in out["error"]["message"], out


@pytest.mark.parametrize("release", ["devices", "holders"])
async def test_a_return_after_an_admin_released_the_borrow_is_done(lend: Running, release: str) -> None:
    await borrow(lend, "laptop", 7)
    async with lend.session.delete(f"{lend.url}/api/v1/admin/items/dev/{release}/laptop") as resp:
        assert resp.status == 200
    status, out = await give_back(lend, "laptop")  # the device comes back from its trip
    assert status == 200 and out["released"] is False and out["returned"] is True, out
    assert lend.ledger.status("dev").seats_used == 0


@pytest.mark.parametrize("days, field", [(0, "borrowDays"), (-3, "borrowDays"), (366, "borrowDays"),
                                         ("7", "borrowDays"), (1.5, "borrowDays")])
async def test_bad_borrow_days_are_400(lend: Running, days: Any, field: str) -> None:
    status, out = await borrow(lend, "laptop", days)
    assert status == 400 and out["error"]["field"] == field, out
    assert lend.ledger.status("dev").seats_used == 0


async def test_borrow_over_the_maximum_or_on_other_items_is_refused(lend: Running) -> None:
    status, out = await borrow(lend, "laptop", 15)
    assert status == 403 and out["error"]["code"] == 115
    assert "over the 14 days" in out["error"]["message"] and "dev" in out["error"]["message"]
    # The next step is about borrowing, not the generic 115 one (fields a license type needs).
    assert "handshake without borrowDays" in out["error"]["message"], out
    assert "per-domain item needs domain" not in out["error"]["message"], out
    status, out = await borrow(lend, "scanner-1", 2, product="scanner", deploymentType="browser")
    assert status == 403 and out["error"]["code"] == 115 and "per-scan" in out["error"]["message"]
    status, out = await borrow(lend, "p-1", 2, product="plain")
    assert status == 403 and out["error"]["code"] == 115 and "does not allow borrowing" in out["error"]["message"]
    assert lend.ledger.status("dev").seats_used == 0 and lend.ledger.status("plain").seats_used == 0


async def test_a_code_may_lower_the_borrowing_limit(lend: Running) -> None:
    async with lend.session.patch(f"{lend.url}/api/v1/admin/handshake-codes/{CODE}",
                                  json={"borrowMaxDays": 3}) as resp:
        assert resp.status == 200
        assert (await resp.json())["borrowMaxDays"] == 3
    status, out = await borrow(lend, "laptop", 5)
    assert status == 403 and out["error"]["code"] == 115 and "3 days" in out["error"]["message"]
    assert (await borrow(lend, "laptop", 3))[0] == 200
    async with lend.session.patch(f"{lend.url}/api/v1/admin/handshake-codes/{CODE}",
                                  json={"borrowMaxDays": 0}) as resp:
        assert resp.status == 200
    status, out = await borrow(lend, "other", 1)
    assert status == 403 and "does not allow borrowing" in out["error"]["message"]
    async with lend.session.patch(f"{lend.url}/api/v1/admin/handshake-codes/{CODE}",
                                  json={"borrowMaxDays": None}) as resp:
        assert (await resp.json())["borrowMaxDays"] is None
    assert (await borrow(lend, "other", 14))[0] == 200
    async with lend.session.patch(f"{lend.url}/api/v1/admin/handshake-codes/{CODE}",
                                  json={"borrowMaxDays": 400}) as resp:
        assert resp.status == 400


async def test_concurrent_borrows_are_capped_at_the_quantity(lend: Running) -> None:
    for i in range(3):
        status, out = await borrow(lend, f"v{i}", 20, product="viewer")
        assert status == 200, out
        assert out["authorization"]["expiresAt"] == out["authorization"]["borrowedUntil"]
    status, out = await borrow(lend, "v3", 20, product="viewer")
    assert status == 403 and out["error"]["code"] == 120 and "borrowed" in out["error"]["message"]
    # Online devices are not limited by the borrows (concurrent items count per slice).
    assert (await lend.handshake(handshakeCode=CODE, clientUuid="online", product="viewer"))[0] == 200
    assert (await devices(lend, "conc"))["borrowed"] == 3
    items = {i["itemId"]: i for i in (await (await lend.session.get(f"{lend.url}/api/v1/admin/items")).json())["items"]}
    assert items["conc"]["borrowed"] == {"used": 3, "limit": 3}
    assert (await give_back(lend, "v0"))[1]["released"] is True
    assert (await borrow(lend, "v3", 20, product="viewer"))[0] == 200


async def test_force_release_of_a_borrowed_seat_warns(lend: Running) -> None:
    _, answer = await borrow(lend, "laptop", 7)
    async with lend.session.delete(f"{lend.url}/api/v1/admin/items/dev/devices/laptop") as resp:
        assert resp.status == 200
        out = await resp.json()
    assert out["borrowedUntil"] == answer["authorization"]["borrowedUntil"]
    assert "keeps working" in out["warning"]
    assert lend.ledger.status("dev").seats_used == 0


async def holders(r: Running, item_id: str) -> dict[str, dict]:
    async with r.session.get(f"{r.url}/api/v1/admin/items/{item_id}/holders") as resp:
        assert resp.status == 200
        return {h["clientUuid"]: h for h in (await resp.json())["holders"]}


@pytest.mark.parametrize("item_id, product", [("dev", "barcode-reader"), ("conc", "viewer")])
async def test_seat_holders_show_a_borrow_and_its_release_warns(lend: Running, item_id: str, product: str) -> None:
    _, answer = await borrow(lend, "laptop", 7, product=product)
    assert (await lend.handshake(handshakeCode=CODE, clientUuid="desk", product=product))[0] == 200
    listed = await holders(lend, item_id)
    assert listed["laptop"]["borrowedUntil"] == answer["authorization"]["borrowedUntil"]
    assert listed["desk"]["borrowedUntil"] is None
    async with lend.session.delete(f"{lend.url}/api/v1/admin/items/{item_id}/holders/laptop") as resp:
        assert resp.status == 200
        out = await resp.json()
    assert "keeps working" in out["warning"]
    assert out["borrowedUntil"] == answer["authorization"]["borrowedUntil"]
    assert "laptop" not in await holders(lend, item_id)
    # The borrowed seat is free again (on the concurrent item too, where holders list authorizations).
    assert (await devices(lend, item_id))["borrowed"] == 0


async def test_statistics_count_a_borrowed_device_in_every_slice_it_covers(lend: Running) -> None:
    start = lend.clock.now
    await borrow(lend, "laptop", 1)
    lend.clock.advance(hours=1)
    await lend.server.roll_up()
    lend.clock.advance(hours=1)
    assert (await give_back(lend, "laptop"))[0] == 200
    lend.clock.advance(hours=5)
    await lend.server.roll_up()
    first = bucket_start(to_ms(start), "3m")
    returned = to_ms(start + timedelta(hours=2))
    expected = len(range(first, returned, SLICE_MS))
    rows = await lend.sql("SELECT bucket_ms, devices FROM rollups WHERE scope = 'item' AND key = 'dev' AND size = '3m'"
                          " ORDER BY bucket_ms")
    counted = {b: d for b, d in rows if d}
    assert len(counted) == expected and set(counted.values()) == {1}
    assert min(counted) == first and max(counted) < returned
    code_rows = await lend.sql("SELECT COUNT(*) FROM rollups WHERE scope = 'code' AND key = ? AND size = '3m'"
                               " AND devices = 1", CODE)
    assert code_rows[0][0] == expected
    # Counted once: rolling up again adds nothing.
    await lend.server.roll_up()
    assert await lend.sql_value("SELECT SUM(devices) FROM rollups WHERE scope = 'item' AND key = 'dev'"
                                " AND size = '3m'") == expected


async def test_borrowed_seat_survives_a_restart(backend: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                vendor: Vendor) -> None:
    from tests.conftest import storage_section

    storage = await storage_section(request, backend, tmp_path)
    cfg_path = write_config(tmp_path, vendor, storage=storage)
    clock = Clock()
    first = Server(config_mod.load(cfg_path, environ={}), clock=clock)
    await first.start()
    (tmp_path / "import" / "a.lic").write_bytes(vendor.issue(license_spec("L1", items=[
        item("dev", quantity=10, period="daily", borrow_max_days=14)])))
    assert first.services is not None
    await first.services.importer.scan("test")
    token = await admin_login(first.urls[0])
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        async with s.post(f"{first.urls[0]}/api/v1/handshake", json={
                "handshakeCode": CODE, "clientUuid": "laptop", "product": "barcode-reader",
                "deploymentType": "browser", "borrowDays": 5}) as resp:
            until = (await resp.json())["authorization"]["borrowedUntil"]
    await first.stop()
    clock.advance(days=2)
    second = Server(config_mod.load(cfg_path, environ={}), clock=clock)
    await second.start()
    try:
        assert second.services is not None
        assert await second.services.ledger.sweep() == 0
        token = await admin_login(second.urls[0])  # the first one expired with the days
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
            async with s.get(f"{second.urls[0]}/api/v1/admin/items/dev/devices") as resp:
                [seat] = (await resp.json())["devices"]
        assert seat["borrowedUntil"] == until
    finally:
        await second.stop()


@pytest.mark.slow
@pytest.mark.sqlite_only
async def test_borrowed_seat_survives_kill_9(backend: str, tmp_path: Path, vendor: Vendor,
                                             daemon_factory: Any) -> None:
    cfg_path = write_config(tmp_path, vendor)
    (tmp_path / "import" / "a.lic").write_bytes(vendor.issue(license_spec("L1", items=[
        item("dev", quantity=10, period="daily", borrow_max_days=14)])))
    daemon = daemon_factory(cfg_path)
    async with aiohttp.ClientSession() as s:
        for _ in range(100):
            async with s.post(f"{daemon.url}/api/v1/handshake", json={
                    "handshakeCode": CODE, "clientUuid": "laptop", "product": "barcode-reader",
                    "deploymentType": "browser", "borrowDays": 9}) as resp:
                if resp.status == 200:
                    until = (await resp.json())["authorization"]["borrowedUntil"]
                    break
        else:
            raise AssertionError("no grant")
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    db = tmp_path / "state" / "lts-server.sqlite3"
    [(borrowed_ms,)] = await query_database(db, "SELECT borrowed_until_ms FROM seats WHERE client_uuid = 'laptop'")
    assert borrowed_ms == to_ms(parse_iso(until))
    again = daemon_factory(cfg_path)
    token = await admin_login(again.url)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        async with s.get(f"{again.url}/api/v1/admin/items/dev/devices") as resp:
            listing = await resp.json()
    assert listing["borrowed"] == 1 and listing["devices"][0]["borrowedUntil"] == until


async def test_the_client_library_borrows_and_returns_across_a_restart(lend: Running, tmp_path: Path) -> None:
    from lts_client import LtsClient

    cache = tmp_path / "device-cache"
    request = {"handshake_code": CODE, "client_uuid": "laptop", "product": "barcode-reader",
               "deployment_type": "browser"}
    async with LtsClient([lend.url], cache_dir=cache) as device:
        auth = await device.borrow(**request, days=5)
    assert auth.borrowed_until is not None
    assert (await devices(lend, "dev"))["borrowed"] == 1
    async with LtsClient([lend.url], cache_dir=cache) as restarted:
        [borrowed] = restarted.borrowed()
        assert borrowed.authorization_id == auth.authorization_id
        answer = await restarted.return_borrowed(borrowed)
        assert answer["released"] is True and answer["itemId"] == "dev"
        assert restarted.borrowed() == []
    assert lend.ledger.status("dev").seats_used == 0
