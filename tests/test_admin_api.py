"""The admin API: authentication, handshake codes, licenses, items, devices, status, OpenAPI."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from lts_server import config as config_mod
from lts_server.server import Server
from lts_server.web.auth import THROTTLE
from lts_server.web.openapi import ROUTES
from tests.conftest import ADMIN_PASSWORD, Running, Vendor, admin_login, item, license_spec, write_config

ADMIN_ROUTES = [(r.method.upper(), r.path) for r in ROUTES if r.admin]


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_before_setup_every_admin_endpoint_answers_403(tmp_path, vendor) -> None:
    from lts_server import config as config_mod
    from lts_server.server import Server

    server = Server(config_mod.load(write_config(tmp_path, vendor), environ={}))
    await server.start()
    try:
        async with aiohttp.ClientSession() as s:
            for method, path in ADMIN_ROUTES:
                async with s.request(method, server.urls[0] + concrete(path)) as resp:
                    assert resp.status == 403, (method, path)
                    assert "setup required" in (await resp.json())["error"]["message"]
            async with s.post(server.urls[0] + "/api/v1/admin/login", json={"password": "x" * 12}) as resp:
                assert resp.status == 403
            async with s.post(server.urls[0] + "/api/v1/admin/setup", json={"password": "short"}) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["field"] == "password"
            async with s.post(server.urls[0] + "/api/v1/admin/setup", json={"password": ADMIN_PASSWORD}) as resp:
                assert resp.status == 201
            async with s.post(server.urls[0] + "/api/v1/admin/setup", json={"password": "another password"}) as r:
                assert r.status == 409
    finally:
        await server.stop()


async def test_without_a_token_every_admin_endpoint_answers_401(running: Running) -> None:
    async with aiohttp.ClientSession() as s:
        for method, path in ADMIN_ROUTES:
            async with s.request(method, running.url + concrete(path)) as resp:
                assert resp.status == 401, (method, path)
        async with s.get(running.url + "/api/v1/admin/status", headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401


async def test_tokens_expire_die_at_logout_and_at_password_change(running: Running) -> None:
    token = await admin_login(running.url)
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=auth) as s:
        async with s.get(running.url + "/api/v1/admin/status") as resp:
            assert resp.status == 200
        running.clock.advance(hours=13)
        async with s.get(running.url + "/api/v1/admin/status") as resp:
            assert resp.status == 401
    running.clock.advance(hours=-13)
    token = await admin_login(running.url)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        async with s.post(running.url + "/api/v1/admin/logout") as resp:
            assert resp.status == 200
        async with s.get(running.url + "/api/v1/admin/status") as resp:
            assert resp.status == 401
    other = await admin_login(running.url)
    async with running.session.post(running.url + "/api/v1/admin/password", json={
            "currentPassword": ADMIN_PASSWORD, "newPassword": "a brand new passphrase"}) as resp:
        assert resp.status == 200
        new_token = (await resp.json())["token"]
    async with aiohttp.ClientSession() as s:
        for t, expected in ((other, 401), (new_token, 200)):
            async with s.get(running.url + "/api/v1/admin/status", headers={"Authorization": f"Bearer {t}"}) as r:
                assert r.status == expected
        async with s.post(running.url + "/api/v1/admin/login", json={"password": ADMIN_PASSWORD}) as resp:
            assert resp.status == 401


async def test_failed_logins_are_slowed_then_refused(running: Running) -> None:
    running.server.runner.app[THROTTLE].base_delay = 0.0
    async with aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(11):
            async with s.post(running.url + "/api/v1/admin/login", json={"password": "wrong password!"}) as resp:
                statuses.append(resp.status)
        assert statuses[:10] == [401] * 10 and statuses[10] == 429
        async with s.post(running.url + "/api/v1/admin/login", json={"password": ADMIN_PASSWORD}) as resp:
            assert resp.status == 429  # locked out for the window, even with the right password


@pytest.fixture
async def admin(running: Running) -> Running:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[
        item("soon", quantity=2, expires_at=item("x")["starts_at"] + timedelta(days=30)), item("late")])))
    await running.drop("b.lic", running.vendor.issue(license_spec("L2", items=[item("other", product="viewer")])))
    return running


async def call(r: Running, method: str, path: str, **kw) -> tuple[int, dict]:
    async with r.session.request(method, r.url + path, **kw) as resp:
        return resp.status, await resp.json()


async def test_code_lifecycle_and_its_effect_on_the_next_handshake(admin: Running) -> None:
    status, codes = await call(admin, "GET", "/api/v1/admin/handshake-codes")
    assert [c["name"] for c in codes["codes"]] == ["216998-L1", "216998-L2"]
    assert codes["codes"][0]["default"] and codes["codes"][0]["items"] == ["soon", "late"]
    status, code = await call(admin, "POST", "/api/v1/admin/handshake-codes", json={
        "organizationId": "216998", "custom": "vehicleCode", "items": ["late", "soon"],
        "domains": ["*.example.com"], "sessionPassword": "open sesame"})
    assert status == 201 and code["name"] == "216998-vehicleCode" and code["passwordSet"]
    assert code["items"] == ["soon", "late"]  # default order: closest expiry first
    hs = dict(handshakeCode="216998-vehicleCode", domain="a.example.com", sessionPassword="open sesame")
    status, body = await admin.handshake(**hs)
    assert status == 200 and body["authorization"]["itemId"] == "soon"
    status, code = await call(admin, "PUT", "/api/v1/admin/handshake-codes/216998-vehicleCode/usage-order",
                              json={"items": ["late", "soon"]})
    assert status == 200 and code["customOrder"] and code["items"] == ["late", "soon"]
    status, body = await admin.handshake(**hs, clientUuid="d2")
    assert body["authorization"]["itemId"] == "late"
    status, code = await call(admin, "DELETE", "/api/v1/admin/handshake-codes/216998-vehicleCode/usage-order")
    assert not code["customOrder"]
    status, code = await call(admin, "PATCH", "/api/v1/admin/handshake-codes/216998-vehicleCode", json={
        "sessionPassword": "", "domains": [], "custom": "vehicles"})
    assert status == 200 and code["name"] == "216998-vehicles" and not code["passwordSet"]
    assert (await admin.handshake(handshakeCode="216998-vehicles", clientUuid="d3"))[0] == 200
    assert (await admin.handshake(handshakeCode="216998-vehicleCode"))[1]["error"]["code"] == 101
    status, _ = await call(admin, "DELETE", "/api/v1/admin/handshake-codes/216998-vehicles")
    assert status == 200
    assert (await admin.handshake(handshakeCode="216998-vehicles"))[1]["error"]["code"] == 101
    await admin.server.roll_up()
    status, stats = await call(admin, "GET", "/api/v1/admin/stats/codes/216998-vehicles?bucket=1d")
    assert status == 200 and stats["exists"] is False and stats["summary"]["all"]["granted"] == 1
    types = [e["type"] for e in await events(admin, "code.")]
    assert types == ["code.created", "code.created", "code.created", "code.reordered", "code.order_reset",
                     "code.edited", "code.password_changed", "code.deleted"]


async def events(r: Running, prefix: str) -> list[dict]:
    import json

    async with r.session.get(r.url + "/api/v1/admin/events") as resp:
        return [e for e in map(json.loads, (await resp.text()).splitlines()) if e["type"].startswith(prefix)]


@pytest.mark.parametrize("body, status, field", [
    ({"organizationId": "216998", "custom": "bad name"}, 400, "custom"),
    ({"organizationId": "216998", "custom": "x" * 65}, 400, "custom"),
    ({"organizationId": "216998", "custom": "L1"}, 409, "custom"),
    ({"organizationId": "216998", "custom": "ok", "items": ["nope"]}, 400, "items[0]"),
    ({"organizationId": "216998", "custom": "ok", "items": "soon"}, 400, "items"),
    ({"organizationId": "216998", "custom": "ok", "domains": ["bad domain!"]}, 400, "domains[0]"),
    ({"organizationId": "999", "custom": "ok"}, 400, "organizationId"),
    ({"organizationId": "216998", "custom": "ok", "colour": 1}, 400, "colour"),
    ({"custom": "ok"}, 400, "organizationId"),
])
async def test_code_validation_names_the_field(admin: Running, body: dict, status: int, field: str) -> None:
    got, answer = await call(admin, "POST", "/api/v1/admin/handshake-codes", json=body)
    assert got == status and answer["error"]["field"] == field, answer


async def test_default_code_name_cannot_change_and_order_must_be_a_permutation(admin: Running) -> None:
    status, answer = await call(admin, "PATCH", "/api/v1/admin/handshake-codes/216998-L1", json={"custom": "x"})
    assert status == 409 and answer["error"]["field"] == "custom"
    status, answer = await call(admin, "PUT", "/api/v1/admin/handshake-codes/216998-L1/usage-order",
                                json={"items": ["soon"]})
    assert status == 400 and answer["error"]["field"] == "items"
    status, answer = await call(admin, "GET", "/api/v1/admin/handshake-codes/216998-none")
    assert status == 404


async def test_license_upload_uses_the_importer(admin: Running) -> None:
    data = admin.vendor.issue(license_spec("L9", items=[item("L9-1")]))
    headers = {"Content-Type": "application/octet-stream"}
    status, body = await call(admin, "POST", "/api/v1/admin/licenses?name=new.lic", data=data, headers=headers)
    assert status == 201 and body["state"] == "imported" and body["license"]["items"] == ["L9-1"]
    status, body = await call(admin, "POST", "/api/v1/admin/licenses?name=new.lic", data=data, headers=headers)
    assert status == 200 and body["state"] == "unchanged"
    tampered = data.replace(b'"quantity": 10', b'"quantity": 90')
    status, body = await call(admin, "POST", "/api/v1/admin/licenses?name=bad.lic", data=tampered, headers=headers)
    assert status == 422 and body["error"]["reason"] == "bad-signature"
    status, body = await call(admin, "GET", "/api/v1/admin/licenses/L9")
    assert status == 200 and body["fileText"].startswith("LTS-LICENSE-FILE 1")
    status, body = await call(admin, "GET", "/api/v1/admin/licenses")
    assert [lic["licenseId"] for lic in body["licenses"]] == ["L1", "L2", "L9"]


async def test_items_revoke_restore_and_devices(admin: Running) -> None:
    assert (await admin.handshake(handshakeCode="216998-L1", clientUuid="dev-a"))[0] == 200
    status, body = await call(admin, "GET", "/api/v1/admin/items")
    soon = next(i for i in body["items"] if i["itemId"] == "soon")
    assert soon["seats"] == {"used": 1, "quantity": 2, "limit": 2}
    status, body = await call(admin, "GET", "/api/v1/admin/items/soon/devices")
    assert [d["clientUuid"] for d in body["devices"]] == ["dev-a"]
    status, _ = await call(admin, "DELETE", "/api/v1/admin/items/soon/devices/dev-a")
    assert status == 200 and admin.ledger.statuses["soon"].seats_used == 0
    status, _ = await call(admin, "DELETE", "/api/v1/admin/items/soon/devices/dev-a")
    assert status == 404
    status, body = await call(admin, "POST", "/api/v1/admin/items/late/revoke")
    assert status == 200 and body["revoked"]
    await call(admin, "POST", "/api/v1/admin/items/soon/revoke")
    assert (await admin.handshake(handshakeCode="216998-L1", clientUuid="dev-b"))[1]["error"]["code"] == 113
    await call(admin, "POST", "/api/v1/admin/items/soon/restore")
    assert (await admin.handshake(handshakeCode="216998-L1", clientUuid="dev-b"))[0] == 200
    assert (await call(admin, "POST", "/api/v1/admin/items/nope/revoke"))[0] == 404


async def test_status_and_openapi(admin: Running) -> None:
    status, body = await call(admin, "GET", "/api/v1/admin/status")
    assert status == 200 and body["counts"]["licenses"] == 2 and body["importDirectory"]["files"] == 2
    assert body["databaseBytes"] > 0 and body["servers"] == ["self"]
    async with aiohttp.ClientSession() as s:
        async with s.get(admin.url + "/api/v1/openapi.json") as resp:
            doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    for path, method in ((r.path, r.method) for r in ROUTES):
        assert method in doc["paths"][path]
    routes = {(r.method, r.resource.canonical) for r in admin.server.runner.app.router.routes()
              if r.method != "HEAD" and not r.resource.canonical.startswith("/portal")}
    documented = {(r.method.upper(), r.path) for r in ROUTES}
    assert routes <= documented | {("GET", "/api/v1/openapi.json")}
    assert "HandshakeBody" in doc["components"]["schemas"]


async def test_admin_api_on_its_own_port(tmp_path, vendor) -> None:
    from lts_server import config as config_mod
    from lts_server.server import Server

    server = Server(config_mod.load(write_config(tmp_path, vendor, admin={"port": 0}), environ={}))
    await server.start()
    try:
        assert server.admin_url != server.urls[0]
        async with aiohttp.ClientSession() as s:
            async with s.post(server.urls[0] + "/api/v1/admin/setup", json={"password": ADMIN_PASSWORD}) as resp:
                assert resp.status == 404
            async with s.post(server.admin_url + "/api/v1/admin/setup", json={"password": ADMIN_PASSWORD}) as r:
                assert r.status == 201
            async with s.get(server.urls[0] + "/api/v1/server") as resp:
                assert resp.status == 200
    finally:
        await server.stop()


async def test_concurrent_wrong_logins_are_counted_before_they_are_checked(running: Running) -> None:
    running.server.runner.app[THROTTLE].base_delay = 0.0
    async with aiohttp.ClientSession() as s:
        async def attempt() -> int:
            async with s.post(running.url + "/api/v1/admin/login", json={"password": "wrong password!"}) as resp:
                return resp.status

        statuses = await asyncio.gather(*(attempt() for _ in range(200)))
    assert statuses.count(401) == 10 and statuses.count(429) == 190


async def test_password_change_is_throttled_like_login(running: Running) -> None:
    running.server.runner.app[THROTTLE].base_delay = 0.0
    statuses = []
    for _ in range(11):
        async with running.session.post(running.url + "/api/v1/admin/password", json={
                "currentPassword": "a wrong guess!", "newPassword": "a brand new passphrase"}) as resp:
            statuses.append(resp.status)
    assert statuses == [400] * 10 + [429]
    async with running.session.post(running.url + "/api/v1/admin/password", json={
            "currentPassword": ADMIN_PASSWORD, "newPassword": "a brand new passphrase"}) as resp:
        assert resp.status == 429


async def _logins(url: str, password: str, forwarded_for: str, n: int) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession(headers={"X-Forwarded-For": forwarded_for}) as s:
        for _ in range(n):
            async with s.post(url + "/api/v1/admin/login", json={"password": password}) as resp:
                statuses.append(resp.status)
    return statuses


async def test_forwarded_for_is_ignored_unless_the_proxy_is_trusted(running: Running) -> None:
    running.server.runner.app[THROTTLE].base_delay = 0.0
    # An attacker cannot dodge the throttle by inventing a new address per request.
    statuses = [(await _logins(running.url, "wrong password!", f"10.0.0.{n}", 1))[0] for n in range(11)]
    assert statuses == [401] * 10 + [429]


async def test_behind_a_trusted_proxy_a_lockout_does_not_block_another_client(tmp_path: Path, vendor: Vendor) -> None:
    server = Server(config_mod.load(write_config(tmp_path, vendor, server={
        "host": "127.0.0.1", "port": 0, "trusted_proxies": ["127.0.0.1/32", "::1"]}), environ={}))
    await server.start()
    try:
        server.runner.app[THROTTLE].base_delay = 0.0
        url = server.urls[0]
        await admin_login(url)
        attacker = await _logins(url, "wrong password!", "203.0.113.9, 127.0.0.1", 12)
        assert attacker == [401] * 10 + [429] * 2
        assert await _logins(url, ADMIN_PASSWORD, "203.0.113.9", 1) == [429]  # locked: the attacker's address
        assert await _logins(url, ADMIN_PASSWORD, "198.51.100.7", 1) == [200]  # the admin elsewhere: not blocked
    finally:
        await server.stop()


async def test_deleting_a_default_code_is_refused_unless_confirmed_and_can_be_restored(admin: Running) -> None:
    status, body = await call(admin, "DELETE", "/api/v1/admin/handshake-codes/216998-L1")
    assert status == 409 and "confirm=default" in body["error"]["message"]
    assert "/api/v1/admin/licenses/L1/default-code" in body["error"]["message"]
    assert (await admin.handshake(organizationId="216998"))[0] == 200
    status, _ = await call(admin, "DELETE", "/api/v1/admin/handshake-codes/216998-L1?confirm=default")
    assert status == 200
    status, body = await admin.handshake(organizationId="216998")
    assert status == 403 and body["error"]["code"] != 0  # no default code for the organization any more
    status, body = await call(admin, "POST", "/api/v1/admin/licenses/L1/default-code")
    assert status == 201 and body["default"] and body["items"] == ["soon", "late"]
    assert (await admin.handshake(organizationId="216998"))[0] == 200
    status, _ = await call(admin, "POST", "/api/v1/admin/licenses/L1/default-code")
    assert status == 409
    status, _ = await call(admin, "POST", "/api/v1/admin/licenses/nope/default-code")
    assert status == 404


async def test_a_deleted_code_without_traffic_keeps_its_statistics(admin: Running) -> None:
    status, _ = await call(admin, "POST", "/api/v1/admin/handshake-codes",
                           json={"organizationId": "216998", "custom": "quiet", "items": ["late"]})
    assert status == 201
    status, _ = await call(admin, "DELETE", "/api/v1/admin/handshake-codes/216998-quiet")
    assert status == 200
    status, body = await call(admin, "GET", "/api/v1/admin/stats/codes/216998-quiet")
    assert status == 200 and body["exists"] is False and body["summary"]["all"]["granted"] == 0
    status, _ = await call(admin, "GET", "/api/v1/admin/stats/codes/216998-never")
    assert status == 404


async def test_item_status_names_units_like_the_authorization(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[item("L1-1", "per-scan",
                                                                                   quantity=100)])))
    status, body = await running.handshake(handshakeCode="216998-L1")
    assert status == 200
    authorization_keys = set(body["authorization"]["units"]) - {"left"}
    status, items = await call(running, "GET", "/api/v1/admin/items")
    assert set(items["items"][0]["units"]) == authorization_keys == {"used", "quantity", "limit"}


async def test_a_code_draws_only_on_its_own_organizations_items(admin: Running) -> None:
    await admin.drop("other.lic", admin.vendor.issue(license_spec("X1", org="777", items=[item("foreign")])))
    status, body = await call(admin, "POST", "/api/v1/admin/handshake-codes",
                              json={"organizationId": "216998", "custom": "mixed", "items": ["soon", "foreign"]})
    assert status == 400 and body["error"]["field"] == "items[1]"
    assert "organization 777" in body["error"]["message"]
    status, body = await call(admin, "PATCH", "/api/v1/admin/handshake-codes/216998-L1",
                              json={"items": ["foreign"]})
    assert status == 400 and body["error"]["field"] == "items[0]"
    assert admin.ledger.codes["216998-L1"].items != ("foreign",)
    status, body = await admin.handshake(handshakeCode="216998-L1", clientUuid="d-x")
    assert status == 200 and body["authorization"]["organizationId"] == "216998"
    assert body["authorization"]["itemId"] != "foreign"
