"""A clock set back: the server grants nothing (160) until the clock catches up or the admin accepts it, and a
clock set back never brings back an expired item."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from lts_server import config as config_mod
from lts_server.server import Server
from tests.conftest import NOW, Clock, Running, Vendor, admin_login, item, license_spec, wait_for, write_config


async def test_a_clock_set_back_grants_nothing_until_it_catches_up(running: Running) -> None:
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1")))
    assert (await running.handshake(handshakeCode="216998-L1"))[0] == 200
    report = {"reportId": "r1", "clientUuid": "device-1", "handshakeCode": "216998-L1", "records": []}
    running.clock.advance(minutes=-4)  # within the 5 minutes of tolerance
    assert (await running.handshake(handshakeCode="216998-L1"))[0] == 200
    running.clock.advance(minutes=-10)
    status, body = await running.handshake(handshakeCode="216998-L1", clientUuid="device-2")
    assert (status, body["error"]["code"], body["error"]["sdkCode"]) == (503, 160, -20160)
    assert "behind" in body["error"]["message"]
    status, body = await running.report(report)
    assert (status, body["error"]["code"]) == (503, 160)
    async with running.session.get(f"{running.url}/api/v1/admin/clock") as resp:
        state = await resp.json()
    assert state["behind"] and state["behindSeconds"] > 300
    assert await running.sql_value("SELECT COUNT(*) FROM seats") == 1  # nothing was granted
    async def alerted() -> bool:
        return any("clock" in s for (s,) in await running.sql("SELECT subject FROM alerts"))
    await wait_for(alerted)
    running.clock.advance(minutes=15)  # caught up
    assert (await running.handshake(handshakeCode="216998-L1", clientUuid="device-2"))[0] == 200


async def test_accepting_a_clock_set_back_serves_again_but_never_revives_an_item(running: Running) -> None:
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1", items=[
        item("L1-1", starts_at=NOW - timedelta(days=60), expires_at=NOW - timedelta(days=10)),
        item("L1-2", product="scanner")])))
    status, body = await running.handshake(handshakeCode="216998-L1")
    assert (status, body["error"]["code"]) == (403, 111)  # expired 10 days ago: past its 7 days of grace
    assert (await running.handshake(handshakeCode="216998-L1", product="scanner"))[0] == 200
    async with running.session.post(f"{running.url}/api/v1/admin/clock/accept") as resp:
        assert resp.status == 409  # nothing to accept
    running.clock.advance(days=-30)  # back to when L1-1 was valid
    assert (await running.handshake(handshakeCode="216998-L1"))[1]["error"]["code"] == 160
    async with running.session.post(f"{running.url}/api/v1/admin/clock/accept") as resp:
        assert resp.status == 200
        accepted = await resp.json()
    assert accepted["acceptedBehindSeconds"] > 29 * 86400
    status, body = await running.handshake(handshakeCode="216998-L1")
    assert (status, body["error"]["code"]) == (403, 111)  # still judged at the latest recorded time
    assert (await running.handshake(handshakeCode="216998-L1", product="scanner", clientUuid="d2"))[0] == 200
    (detail,) = await running.sql("SELECT detail FROM events WHERE type = 'clock.accepted'")
    assert "behindSeconds" in detail[0]


@pytest.mark.sqlite_only
async def test_the_latest_time_survives_a_restart(backend: str, tmp_path: Path, vendor: Vendor) -> None:
    cfg = config_mod.load(write_config(tmp_path, vendor), environ={})
    clock = Clock()
    (tmp_path / "import" / "l1.lic").write_bytes(vendor.issue(license_spec("L1")))
    server = Server(cfg, clock=clock)
    await server.start()
    body = {"handshakeCode": "216998-L1", "clientUuid": "d", "product": "barcode-reader", "deploymentType": "browser"}
    async with aiohttp.ClientSession() as s:
        clock.advance(hours=2)
        async with s.post(f"{server.urls[0]}/api/v1/handshake", json=body) as resp:
            assert resp.status == 200
        await server.stop()
        clock.advance(hours=-1)  # restarted with a clock an hour behind what it granted at
        server = Server(cfg, clock=clock)
        await server.start()
        try:
            async with s.post(f"{server.urls[0]}/api/v1/handshake", json=body) as resp:
                assert resp.status == 503 and (await resp.json())["error"]["code"] == 160
            token = await admin_login(server.urls[0])
            async with s.post(f"{server.urls[0]}/api/v1/admin/clock/accept",
                              headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200
            async with s.post(f"{server.urls[0]}/api/v1/handshake", json=body) as resp:
                assert resp.status == 200
        finally:
            await server.stop()
    server = Server(cfg, clock=clock)  # the acceptance holds across a restart
    await server.start()
    try:
        async with aiohttp.ClientSession() as s, s.post(f"{server.urls[0]}/api/v1/handshake", json=body) as resp:
            assert resp.status == 200
    finally:
        await server.stop()
