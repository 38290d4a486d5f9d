"""Trust from the vendor's key to the device, through the real server: bound license files, answers a device
verifies with only the vendor's key, a second server that forges, clone detection, revocation, the clock."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lts_client import LicenseRefused, LtsClient, Trust, UntrustedKey
from lts_client.trust import key_id
from lts_server import config as config_mod
from lts_server.server import Server
from tests.conftest import Clock, Running, item, license_spec, wait_for, write_config


def vendor_keys(running: Running) -> dict[str, str]:
    from cryptography.hazmat.primitives import serialization
    raw = running.vendor.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {key_id(raw): base64.b64encode(raw).decode()}


def bound(running: Running, license_id: str = "L1", **kw: Any) -> bytes:
    ident = running.server.services.identity
    return running.vendor.issue(license_spec(license_id, server_uuid=ident.server_uuid,
                                             server_key=ident.public_key_b64, **kw))


REQUEST = {"handshake_code": "216998-L1", "client_uuid": "dev-1", "product": "barcode-reader",
           "deployment_type": "browser", "device_fingerprint": None}


async def test_a_device_with_only_the_vendor_key_verifies_a_bound_server(running: Running, tmp_path: Path) -> None:
    await running.drop("l1.lic", bound(running))
    status, answer = await running.handshake(handshakeCode="216998-L1")
    assert status == 200
    binding = answer["binding"]
    statement = base64.b64decode(binding["statement"])
    assert answer["authorization"]["bindingSha256"] == hashlib.sha256(statement).hexdigest()
    assert json.loads(statement)["serverKey"] == running.server.services.identity.public_key_b64
    assert "refreshBy" in answer["authorization"]
    cache = tmp_path / "cache"
    async with LtsClient([running.url], vendor_keys=vendor_keys(running), cache_dir=cache) as client:
        auth = await client.handshake(**{**REQUEST, "client_uuid": "dev-2"})
    assert auth.trust is Trust.VENDOR
    assert not (cache / "keys.json").exists()


async def test_an_unbound_file_still_works_with_pinned_keys(running: Running) -> None:
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1")))
    status, answer = await running.handshake(handshakeCode="216998-L1")
    assert status == 200 and "binding" not in answer and "bindingSha256" not in answer["authorization"]
    ident = running.server.services.identity
    async with LtsClient([running.url], public_keys={ident.key_id: ident.public_key_b64}) as client:
        assert (await client.handshake(**REQUEST)).trust is Trust.PINNED
    async with LtsClient([running.url], vendor_keys=vendor_keys(running)) as client:
        with pytest.raises(UntrustedKey):  # only the vendor's key: an unbound server cannot be verified
            await client.handshake(**REQUEST)


async def test_a_file_bound_to_another_identity_key_is_rejected(running: Running) -> None:
    ident = running.server.services.identity
    other = base64.b64encode(b"\x01" * 32).decode()
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1", server_uuid=ident.server_uuid,
                                                                   server_key=other)))
    async with running.session.get(f"{running.url}/api/v1/admin/imports") as resp:
        (state,) = (await resp.json())["files"]
    assert state["state"] == "rejected" and state["reason"].startswith("wrong-server-key:")


async def test_a_second_server_answering_for_the_first_is_refused_and_nothing_cached(
        running: Running, tmp_path: Path) -> None:
    """Client pinned to server A's key (or trusting the vendor); server B, with its own identity, answers."""
    await running.drop("l1.lic", bound(running))
    other = (tmp_path / "b").resolve()
    other.mkdir()
    b = Server(config_mod.load(write_config(other, running.vendor), environ={}), clock=Clock())
    await b.start()
    try:
        # B holds a copy of A's license file (it does not import: bound elsewhere) and one unbound file.
        (other / "import" / "l1.lic").write_bytes(running.vendor.issue(license_spec("L1")))
        await b.services.importer.scan("test")
        ident = running.server.services.identity
        cache = tmp_path / "cache"
        for keys in ({"public_keys": {ident.key_id: ident.public_key_b64}}, {"vendor_keys": vendor_keys(running)}):
            async with LtsClient([b.urls[0]], cache_dir=cache, **keys) as client:
                with pytest.raises(UntrustedKey):
                    await client.handshake(**REQUEST)
        assert not cache.exists() or not list(cache.iterdir())
    finally:
        await b.stop()


async def test_a_cloned_client_uuid_is_refused_with_151_and_the_admin_resets_it(running: Running) -> None:
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1")))
    assert (await running.handshake(handshakeCode="216998-L1", deviceFingerprint="machine-a"))[0] == 200
    assert (await running.handshake(handshakeCode="216998-L1", deviceFingerprint="machine-a"))[0] == 200
    status, body = await running.handshake(handshakeCode="216998-L1", deviceFingerprint="machine-b")
    assert (status, body["error"]["code"], body["error"]["sdkCode"]) == (403, 151, -20151)
    events = await running.sql("SELECT type, result FROM events WHERE client_uuid = 'device-1' ORDER BY seq")
    assert ("device.clone_detected", None) in events and ("handshake", 151) in events
    async with running.session.get(f"{running.url}/api/v1/admin/devices/device-1/binding") as resp:
        info = await resp.json()
    assert info["clones"] == 1 and info["lastCloneAt"]
    async with running.session.get(f"{running.url}/api/v1/admin/devices/clones") as resp:
        assert [c["clientUuid"] for c in (await resp.json())["clones"]] == ["device-1"]
    # The alert went out (one notification, kind clone).
    async def alerted() -> bool:
        return any("clone device-1" in s for (s,) in await running.sql("SELECT subject FROM alerts"))
    await wait_for(alerted)
    async with running.session.delete(f"{running.url}/api/v1/admin/devices/device-1/binding") as resp:
        assert resp.status == 200
    assert (await running.handshake(handshakeCode="216998-L1", deviceFingerprint="machine-b"))[0] == 200
    assert await running.sql_value("SELECT COUNT(*) FROM events WHERE type = 'device.binding_reset'") == 1
    status, _ = await running.handshake(handshakeCode="216998-L1", deviceFingerprint="machine-a")
    assert status == 403
    async with running.session.delete(f"{running.url}/api/v1/admin/devices/nobody/binding") as resp:
        assert resp.status == 404


async def test_a_fingerprint_over_256_bytes_is_a_400(running: Running) -> None:
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1")))
    status, body = await running.handshake(handshakeCode="216998-L1", deviceFingerprint="\u00e9" * 129)
    assert status == 400 and body["error"]["field"] == "deviceFingerprint"
    status, body = await running.handshake(handshakeCode="216998-L1", deviceFingerprint="x" * 257)
    assert status == 400 and body["error"]["field"] == "deviceFingerprint"
    assert await running.sql_value("SELECT COUNT(*) FROM events WHERE type = 'handshake'") == 0


async def test_a_forced_release_ends_the_authorization(running: Running) -> None:
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1", items=[item("L1-1", quantity=1)])))
    status, _ = await running.handshake(handshakeCode="216998-L1")
    assert status == 200
    report = {"reportId": "r1", "clientUuid": "device-1", "handshakeCode": "216998-L1", "records": []}
    assert (await running.report(report))[0] == 200
    async with running.session.delete(f"{running.url}/api/v1/admin/items/L1-1/devices/device-1") as resp:
        assert resp.status == 200
    status, body = await running.report({**report, "reportId": "r2"})
    assert status == 403 and body["error"]["code"] == 104
    # One next step, the one that helps: the code's items are not what is wrong.
    assert body["error"]["message"].endswith("; handshake again, then report under the new authorization")
    assert "add license items" not in body["error"]["message"]
    # Another device takes the freed seat; the released one's next handshake decides afresh: the item is full.
    assert (await running.handshake(handshakeCode="216998-L1", clientUuid="device-2"))[0] == 200
    status, body = await running.handshake(handshakeCode="216998-L1")
    assert status == 403 and body["error"]["code"] == 120


async def test_a_renewal_ends_the_authorizations_it_covered(running: Running) -> None:
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1")))
    assert (await running.handshake(handshakeCode="216998-L1"))[0] == 200
    report = {"reportId": "r1", "clientUuid": "device-1", "handshakeCode": "216998-L1", "records": []}
    running.clock.advance(seconds=1)
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1", revision=2)))
    status, body = await running.report(report)
    assert status == 403 and body["error"]["code"] == 104 and "replaced" in body["error"]["message"]
    running.clock.advance(seconds=1)
    assert (await running.handshake(handshakeCode="216998-L1"))[0] == 200
    assert (await running.report(report))[0] == 200


async def test_deleting_a_code_ends_its_authorizations(running: Running) -> None:
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1")))
    async with running.session.post(f"{running.url}/api/v1/admin/handshake-codes", json={
            "organizationId": "216998", "custom": "extra", "items": ["L1-1"]}) as resp:
        assert resp.status == 201
    assert (await running.handshake(handshakeCode="216998-extra"))[0] == 200
    async with running.session.delete(f"{running.url}/api/v1/admin/handshake-codes/216998-extra") as resp:
        assert resp.status == 200
    assert await running.sql_value("SELECT COUNT(*) FROM authorizations WHERE code = '216998-extra'") == 0
    async with running.session.post(f"{running.url}/api/v1/admin/handshake-codes", json={
            "organizationId": "216998", "custom": "extra", "items": ["L1-1"]}) as resp:
        assert resp.status == 201
    status, body = await running.report({"reportId": "r1", "clientUuid": "device-1",
                                         "handshakeCode": "216998-extra", "records": []})
    assert status == 403 and body["error"]["code"] == 104


async def test_refresh_by_and_the_offline_bound(running: Running) -> None:
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1", items=[
        item("L1-1"), item("L1-2", "per-concurrent-device", product="scanner")])))
    _, answer = await running.handshake(handshakeCode="216998-L1")
    auth = answer["authorization"]
    issued = _t(auth["issuedAt"])
    assert _t(auth["refreshBy"]) - issued == timedelta(minutes=60)
    assert timedelta(days=300) < _t(auth["expiresAt"]) - issued <= timedelta(days=365)  # the period, to the expiry
    _, answer = await running.handshake(handshakeCode="216998-L1", product="scanner", clientUuid="d2")
    auth = answer["authorization"]
    assert _t(auth["expiresAt"]) - _t(auth["issuedAt"]) == timedelta(hours=1)  # at most an hour offline


def _t(text: str) -> Any:
    from lts_server.core.times import parse_iso
    return parse_iso(text)


@pytest.mark.sqlite_only
async def test_max_offline_hours_caps_every_authorization(backend: str, tmp_path: Path, vendor: Any) -> None:
    cfg = config_mod.load(write_config(tmp_path, vendor, authorizations={"max_offline_hours": 24,
                                                                         "refresh_minutes": 15}), environ={})
    server = Server(cfg, clock=Clock())
    await server.start()
    try:
        (tmp_path / "import" / "l1.lic").write_bytes(vendor.issue(license_spec("L1")))
        await server.services.importer.scan("test")
        async with aiohttp.ClientSession() as s, s.post(f"{server.urls[0]}/api/v1/handshake", json={
                "handshakeCode": "216998-L1", "clientUuid": "d", "product": "barcode-reader",
                "deploymentType": "browser"}) as resp:
            auth = (await resp.json())["authorization"]
        assert _t(auth["expiresAt"]) - _t(auth["issuedAt"]) == timedelta(hours=24)
        assert _t(auth["refreshBy"]) - _t(auth["issuedAt"]) == timedelta(minutes=15)
        # The seat keeps its period: only the signed authorization is shorter.
        assert server.services.ledger.seat_expiry("L1-1", "d") - _t(auth["issuedAt"]) > timedelta(days=300)
    finally:
        await server.stop()


async def test_the_client_follows_refresh_by_and_a_refusal_ends_its_cache(running: Running, tmp_path: Path) -> None:
    await running.drop("l1.lic", bound(running, items=[item("L1-1", quantity=1)]))
    cache = tmp_path / "cache"
    now = running.clock.now
    async with LtsClient([running.url], vendor_keys=vendor_keys(running), cache_dir=cache) as client:
        first = await client.handshake(**REQUEST, now=now)
        assert (await client.handshake(**REQUEST, now=now + timedelta(minutes=30))).raw == first.raw
        async with running.session.delete(f"{running.url}/api/v1/admin/items/L1-1/devices/dev-1") as resp:
            assert resp.status == 200
        assert (await running.handshake(handshakeCode="216998-L1", clientUuid="taker"))[0] == 200
        running.clock.advance(minutes=61)
        with pytest.raises(LicenseRefused) as refused:
            await client.handshake(**REQUEST, now=running.clock.now)
        assert refused.value.code == 120
    assert not list(cache.glob("auth-*"))


async def test_no_key_or_password_reaches_the_log_and_state_is_owner_only(tmp_path: Path, vendor: Any) -> None:
    import os
    import stat

    from lts_server import identity
    from tests.conftest import ADMIN_PASSWORD, admin_login, start_daemon, stop_daemon

    ident = identity.load_or_create(tmp_path / "state")
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / "l1.lic").write_bytes(vendor.issue(license_spec(
        "L1", server_uuid=ident.server_uuid, server_key=ident.public_key_b64)))
    cfg = write_config(tmp_path, vendor, log={"level": "debug", "format": "json"})
    daemon = start_daemon(cfg, tmp_path)
    seen: list[str] = []
    try:
        token = await admin_login(daemon.url)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
            async with s.patch(f"{daemon.url}/api/v1/admin/handshake-codes/216998-L1",
                               json={"sessionPassword": "hunter2-session"}) as resp:
                assert resp.status == 200
            for password in ("hunter2-session", "wrong-password-x"):
                async with s.post(f"{daemon.url}/api/v1/handshake", json={
                        "handshakeCode": "216998-L1", "clientUuid": "d", "product": "barcode-reader",
                        "deploymentType": "browser", "sessionPassword": password,
                        "deviceFingerprint": "fp"}) as resp:
                    body = await resp.json()
                    if resp.status == 200:
                        seen.append(body["reportKey"])
            async with s.get(f"{daemon.url}/api/v1/usage/export") as resp:
                assert resp.status == 200
    finally:
        assert stop_daemon(daemon) == 0
    log = daemon.log()
    pem = identity.to_pem(ident.signing_key).decode().splitlines()[1]
    for secret in (*seen, "hunter2-session", "wrong-password-x", ADMIN_PASSWORD, token, pem, ident.secret.hex()):
        assert secret not in log
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for entry in os.scandir(state):
        if entry.is_file():
            assert stat.S_IMODE(entry.stat().st_mode) == 0o600, entry.name
