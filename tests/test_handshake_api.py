"""POST /api/v1/handshake through HTTP: grants, every refusal code, malformed input, durability."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lts_server.core.codes import CodeFields
from lts_server.store import StoreFull
from tests.conftest import NOW, Running, item, license_spec


@pytest.fixture
async def demo(running: Running) -> Running:
    v = running.vendor
    await running.drop("a.lic", v.issue(license_spec("L1", items=[
        item("soon", quantity=10, expires_at=NOW + timedelta(days=30)),
        item("late", quantity=20, expires_at=NOW + timedelta(days=300)),
    ])))
    await running.drop("b.lic", v.issue(license_spec("L2", items=[
        item("scan", "per-scan", quantity=1000, deployment_type="desktop"),
        item("inst", "per-concurrent-instance", quantity=8, product="viewer"),
        item("dom", "per-domain", quantity=1, product="web", edition="pro"),
        item("future", starts_at=NOW + timedelta(days=5), product="next"),
        item("old", starts_at=NOW - timedelta(days=400), expires_at=NOW - timedelta(days=8), product="old"),
    ])))
    await running.drop("c.lic", v.issue(license_spec("G1", org="305511", items=[
        item("mob", "per-concurrent-device", deployment_type="mobile", product="labels")])))
    return running


async def test_grant_is_signed_over_the_exact_bytes(demo: Running) -> None:
    async with demo.session.post(f"{demo.url}/api/v1/handshake", json={
        "handshakeCode": "216998-L1", "clientUuid": "dev-1", "product": "barcode-reader",
        "deploymentType": "browser", "version": "10.2"}) as resp:
        assert resp.status == 200
        body = await resp.read()
    async with demo.session.get(f"{demo.url}/api/v1/server") as resp:
        info = await resp.json()
    raw = body[len(b'{"authorization":'): body.index(b',"signature":')]
    envelope = json.loads(body)
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(info["publicKey"]))
    key.verify(base64.b64decode(envelope["signature"]), raw)
    assert envelope["keyId"] == info["keyId"]
    auth = envelope["authorization"]
    assert auth["serverUuid"] == info["serverUuid"]
    assert (auth["handshakeCode"], auth["itemId"], auth["clientUuid"]) == ("216998-L1", "soon", "dev-1")
    assert auth["licenseType"] == "per-device"
    assert auth["seats"] == {"used": 1, "quantity": 10, "limit": 11, "left": 10}
    # per-device: the authorization lasts the period, capped at the item's expiry
    assert auth["expiresAt"].startswith((NOW + timedelta(days=30)).strftime("%Y-%m-%d"))


async def test_same_device_never_takes_a_second_seat(demo: Running) -> None:
    for _ in range(3):
        status, _body = await demo.handshake(handshakeCode="216998-L1", clientUuid="same")
        assert status == 200
    assert await demo.sql_value("SELECT COUNT(*) FROM seats") == 1
    assert demo.ledger.statuses["soon"].seats_used == 1


async def test_usage_order_moves_to_the_next_item_when_full(demo: Running) -> None:
    items = []
    for n in range(12):
        status, body = await demo.handshake(handshakeCode="216998-L1", clientUuid=f"d{n}")
        assert status == 200
        items.append(body["authorization"]["itemId"])
    assert items == ["soon"] * 11 + ["late"]  # 10 seats + round(10% x 10) grace


async def test_custom_order_takes_effect_on_the_next_handshake(demo: Running) -> None:
    await demo.ledger.set_usage_order("216998-L1", ("late", "soon"))
    status, body = await demo.handshake(handshakeCode="216998-L1")
    assert body["authorization"]["itemId"] == "late"
    await demo.ledger.set_usage_order("216998-L1", None)
    status, body = await demo.handshake(handshakeCode="216998-L1", clientUuid="other")
    assert body["authorization"]["itemId"] == "soon"


async def test_lapsed_seats_are_swept_and_recorded(demo: Running) -> None:
    await demo.drop("d.lic", demo.vendor.issue(license_spec("D", items=[item("daily", quantity=1, period="daily",
                                                                              product="daily")])))
    assert (await demo.handshake(handshakeCode="216998-D", product="daily"))[0] == 200
    assert (await demo.handshake(handshakeCode="216998-D", product="daily", clientUuid="x"))[0] == 403
    demo.clock.advance(hours=25)
    assert await demo.ledger.sweep() == 1
    assert (await demo.handshake(handshakeCode="216998-D", product="daily", clientUuid="x"))[0] == 200
    released = await demo.sql("SELECT client_uuid, detail FROM events WHERE type = 'seat.released'")
    assert released == [("device-1", '{"reason":"lapsed"}')]


async def expect(running: Running, code: int, **body) -> dict:
    status, answer = await running.handshake(**body)
    assert status == 403, answer
    err = answer["error"]
    assert err["code"] == code and err["sdkCode"] == -20000 - code and err["message"], err
    return err


async def test_every_refusal_code(demo: Running) -> None:
    lic2 = dict(handshakeCode="216998-L2")
    await expect(demo, 101, handshakeCode="216998-none")
    await demo.ledger.edit_code("216998-L1", CodeFields(password_hash=demo.ledger.hash_session_password("s3cret")))
    await expect(demo, 102, handshakeCode="216998-L1", sessionPassword="wrong")
    await expect(demo, 102, handshakeCode="216998-L1")
    assert (await demo.handshake(handshakeCode="216998-L1", sessionPassword="s3cret"))[0] == 200
    await demo.ledger.edit_code("216998-L2", CodeFields(domains=("*.example.com",)))
    await expect(demo, 103, **lic2, product="web", domain="evil.org", edition="pro")
    await demo.ledger.edit_code("216998-L2", CodeFields(domains=()))
    await demo.ledger.create_code("216998", CodeFields(custom="empty"))
    await expect(demo, 104, handshakeCode="216998-empty")
    await expect(demo, 106, **lic2, product="nothing")
    await expect(demo, 108, **lic2, product="viewer", deploymentType="desktop")
    await expect(demo, 109, **lic2, product="web", domain="a.example.com", edition="lite")
    await expect(demo, 111, **lic2, product="old")
    await expect(demo, 112, **lic2, product="next")
    await demo.ledger.set_revoked("scan", True)
    await expect(demo, 113, **lic2, deploymentType="desktop")
    await demo.ledger.set_revoked("scan", False)
    await demo.ledger.create_code("305511", CodeFields(custom="app", items=("mob",), app_ids=("com.acme",)))
    await expect(demo, 114, handshakeCode="305511-app", product="labels", deploymentType="mobile", appId="com.x")
    await expect(demo, 115, **lic2, product="web", edition="pro")
    for n in range(11):
        await demo.handshake(handshakeCode="216998-L1", sessionPassword="s3cret", clientUuid=f"f{n}")
    await demo.ledger.create_code("216998", CodeFields(custom="soon", items=("soon",)))
    await expect(demo, 120, handshakeCode="216998-soon", clientUuid="one-too-many")
    await expect(demo, 121, organizationId="424242")
    await expect(demo, 122, handshakeCode="216998-L1", organizationId="305511")
    await expect(demo, 123)
    await expect(demo, 130, **lic2, product="viewer", deploymentType="server", instances=9)


async def test_item_removed_from_existence_gives_124(demo: Running) -> None:
    await demo.ledger.create_code("216998", CodeFields(custom="x", items=("scan",)))
    # An item can vanish only through the database (e.g. a restored backup); the code still names it.
    demo.ledger.items.pop("scan")
    await expect(demo, 124, handshakeCode="216998-x", deploymentType="desktop")


async def test_organization_alone_uses_its_first_default_code(demo: Running) -> None:
    status, body = await demo.handshake(organizationId="216998")
    assert status == 200 and body["authorization"]["handshakeCode"] == "216998-L1"
    status, body = await demo.handshake(organizationId="305511", product="labels", deploymentType="mobile")
    assert status == 200 and body["authorization"]["licenseType"] == "per-concurrent-device"


async def test_every_handshake_is_an_event(demo: Running) -> None:
    await demo.handshake(handshakeCode="216998-L1", clientUuid="ok")
    await demo.handshake(handshakeCode="216998-nope", clientUuid="bad")
    rows = await demo.sql(
        "SELECT code, item_id, client_uuid, product, deployment_type, result FROM events WHERE type = 'handshake'"
        " ORDER BY seq")
    assert rows == [("216998-L1", "soon", "ok", "barcode-reader", "browser", 0),
                    ("216998-nope", None, "bad", "barcode-reader", "browser", 101)]


async def test_session_passwords_are_stored_as_keyed_hashes(demo: Running) -> None:
    await demo.ledger.edit_code("216998-L1", CodeFields(password_hash=demo.ledger.hash_session_password("pw-123")))
    stored = await demo.sql_value("SELECT password_hash FROM handshake_codes WHERE name = '216998-L1'")
    assert stored.startswith("hmac-sha256$") and "pw-123" not in stored


@pytest.mark.parametrize("body, field", [
    ({"product": "x", "deploymentType": "browser"}, "clientUuid"),
    ({"clientUuid": "d", "deploymentType": "browser"}, "product"),
    ({"clientUuid": "d", "product": "x"}, "deploymentType"),
    ({"clientUuid": "d", "product": "x", "deploymentType": "fridge"}, "deploymentType"),
    ({"clientUuid": 5, "product": "x", "deploymentType": "browser"}, "clientUuid"),
    ({"clientUuid": "d", "product": "x", "deploymentType": "browser", "instances": "2"}, "instances"),
    ({"clientUuid": "d", "product": "x", "deploymentType": "browser", "instances": 0}, "instances"),
    ({"clientUuid": "d", "product": "x", "deploymentType": "browser", "colour": "red"}, "colour"),
    ({"clientUuid": "d", "product": "x" * 129, "deploymentType": "browser"}, "product"),
    ({"clientUuid": "d" * 200, "product": "x", "deploymentType": "browser"}, "clientUuid"),
])
async def test_malformed_bodies_name_the_field(running: Running, body: dict, field: str) -> None:
    async with running.session.post(f"{running.url}/api/v1/handshake", json=body) as resp:
        assert resp.status == 400
        err = (await resp.json())["error"]
    assert err["field"] == field and field in err["message"]


@pytest.mark.parametrize("data, headers, needle", [
    (b"{not json", {"Content-Type": "application/json"}, "not valid JSON"),
    # Truncated after an unknown field or a wrong type: the body is not JSON, and that is said first.
    (b'{"x":', {"Content-Type": "application/json"}, "not valid JSON: Input data was truncated"),
    (b'{"clientUuid": 5, ', {"Content-Type": "application/json"}, "not valid JSON"),
    (b"[]", {"Content-Type": "application/json"}, "Expected `object`"),
    (b'{"clientUuid": "d"}', {"Content-Type": "text/plain"}, "Content-Type must be application/json"),
    (b'{"clientUuid": "' + b"x" * 20000 + b'"}', {"Content-Type": "application/json"}, "at most 16384"),
])
async def test_malformed_requests_get_400_never_500(running: Running, data: bytes, headers: dict, needle: str) -> None:
    async with running.session.post(f"{running.url}/api/v1/handshake", data=data, headers=headers) as resp:
        assert resp.status == 400
        assert needle in (await resp.json())["error"]["message"]


async def test_wrong_method_and_path_are_json_errors(running: Running) -> None:
    async with running.session.get(f"{running.url}/api/v1/handshake") as resp:
        assert resp.status == 405 and (await resp.json())["error"]["code"] == 405
    async with running.session.get(f"{running.url}/api/v1/nothing") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == 404


async def test_a_failed_commit_grants_nothing_and_loses_no_seat(demo: Running, monkeypatch) -> None:
    store = demo.server.services.store
    real_write = store.write

    async def full(batch, pipeline=None):  # noqa: ANN001, ANN202
        raise StoreFull("database /x: database or disk is full; free disk space, then retry")

    monkeypatch.setattr(store, "write", full)
    status, body = await demo.handshake(handshakeCode="216998-L1", clientUuid="d1")
    assert status == 503 and "full" in body["error"]["message"]
    assert demo.ledger.statuses["soon"].seats_used == 0 and "soon" not in (await demo.ledger.device("d1")).seats
    monkeypatch.setattr(store, "write", real_write)
    status, body = await demo.handshake(handshakeCode="216998-L1", clientUuid="d1")
    assert status == 200 and body["authorization"]["seats"]["used"] == 1
    assert await demo.sql_value("SELECT seats_used FROM items WHERE item_id = 'soon'") == 1


async def test_concurrent_requests_share_commits_and_count_exactly(demo: Running) -> None:
    async def one(n: int) -> int:
        return (await demo.handshake(handshakeCode="216998-L1", clientUuid=f"c{n}"))[0]

    statuses = await asyncio.gather(*(one(n) for n in range(60)))
    assert statuses.count(200) == 11 + 22  # soon: 10 + 1 grace, late: 20 + 2 grace
    assert await demo.sql_value("SELECT SUM(seats_used) FROM items") == 33
    assert await demo.sql_value("SELECT COUNT(*) FROM events WHERE type = 'handshake'") == 60


async def test_device_answers_say_nosniff_whatever_their_outcome(demo: Running) -> None:
    """The device routes bypass the middleware stack; their answers keep the header every answer carries."""
    url = f"{demo.url}/api/v1/handshake"
    grant = {"handshakeCode": "216998-L1", "clientUuid": "n1", "product": "barcode-reader", "deploymentType": "browser"}
    for body, status in ((json.dumps(grant).encode(), 200),
                         (json.dumps({**grant, "handshakeCode": "216998-nope"}).encode(), 403),
                         (b'{"clientUuid":"a","clientUuid":"b"}', 400)):
        async with demo.session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == status, await resp.text()
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Content-Type"].startswith("application/json")


async def test_a_handshake_sent_with_expect_100_continue_is_granted(demo: Running) -> None:
    body = {"handshakeCode": "216998-L1", "clientUuid": "e1", "product": "barcode-reader", "deploymentType": "browser"}
    async with demo.session.post(f"{demo.url}/api/v1/handshake", json=body, expect100=True) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["authorization"]["clientUuid"] == "e1"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_a_bug_on_the_device_route_is_a_json_500_with_the_traceback_in_the_log(
        demo: Running, monkeypatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("boom")

    monkeypatch.setattr("lts_server.web.device.to_request", broken)
    with caplog.at_level("ERROR", logger="lts_server"):
        status, body = await demo.handshake(handshakeCode="216998-L1", clientUuid="b1")
    assert status == 500 and body["error"]["code"] == 500 and "RuntimeError" in body["error"]["message"]
    assert any(r.exc_info for r in caplog.records), "the log gets the traceback"
