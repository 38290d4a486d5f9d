"""Against the real running daemon: atomic seats under load, and the client library."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from lts_client import BadSignature, LicenseRefused, LtsClient, ServerUnavailable, verify
from tests.conftest import (
    Daemon,
    Vendor,
    free_port,
    item,
    license_spec,
    query_database,
    start_daemon,
    stop_daemon,
    storage_section,
    write_config,
)


@pytest.fixture
async def daemon(request: pytest.FixtureRequest, backend: str, tmp_path: Path, vendor: Vendor) -> AsyncIterator[Daemon]:
    """The daemon as a process, on each backend."""
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / "a.lic").write_bytes(vendor.issue(license_spec("L1", items=[item("L1-1", quantity=100)])))
    (tmp_path / "import" / "b.lic").write_bytes(vendor.issue(license_spec("L2", items=[item("L2-1", "per-scan")])))
    storage = await storage_section(request, backend, tmp_path)
    d = start_daemon(write_config(tmp_path, vendor, storage=storage), tmp_path)
    d.database = storage.get("url") or tmp_path / "state" / "lts-server.sqlite3"
    yield d
    assert stop_daemon(d) == 0


async def test_500_concurrent_devices_get_exactly_110_seats(daemon: Daemon, tmp_path: Path) -> None:
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(n: int) -> int:
            async with session.post(f"{daemon.url}/api/v1/handshake", json={
                    "handshakeCode": "216998-L1", "clientUuid": f"device-{n}", "product": "barcode-reader",
                    "deploymentType": "browser"}) as resp:
                body = await resp.json()
                if resp.status == 403:
                    assert body["error"]["code"] == 120
                return resp.status

        statuses = await asyncio.gather(*(one(n) for n in range(500)))
    assert statuses.count(200) == 110
    assert statuses.count(403) == 390
    assert await query_database(daemon.database, "SELECT COUNT(*) FROM seats") == [(110,)]
    assert await query_database(daemon.database, "SELECT seats_used FROM items WHERE item_id = 'L1-1'") == [(110,)]
    assert await query_database(daemon.database, "SELECT COUNT(*) FROM events WHERE type = 'handshake'") == [(500,)]


async def test_client_fails_over_verifies_and_caches(daemon: Daemon, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cache = tmp_path / "client-cache"
    async with LtsClient([dead, daemon.url], cache_dir=cache) as client:
        auth = await client.handshake(handshake_code="216998-L1", client_uuid="dev-a", product="barcode-reader",
                                      deployment_type="browser")
        assert auth.server == daemon.url
        assert auth.fields["itemId"] == "L1-1"
        again = await client.handshake(handshake_code="216998-L1", client_uuid="dev-a", product="barcode-reader",
                                       deployment_type="browser")
        assert again.raw == auth.raw  # served from the cache, no new request
        later = datetime.now(UTC) + timedelta(hours=2)
        fresh = await client.handshake(handshake_code="216998-L1", client_uuid="dev-a", product="barcode-reader",
                                       deployment_type="browser", now=later)
        assert fresh.raw != auth.raw  # past the cached one's refreshBy: asked again
    assert await query_database(daemon.database, "SELECT COUNT(*) FROM events WHERE type = 'handshake'") == [(2,)]
    # A cache edited by hand is not trusted.
    cached = next(cache.glob("auth-*.json"))
    data = json.loads(cached.read_text())
    signature = json.loads(base64.b64decode(data["answer"]))["signature"]
    data["answer"] = base64.b64encode(base64.b64decode(data["answer"]).replace(
        signature.encode(), signature[::-1].encode())).decode()
    cached.write_text(json.dumps(data))
    async with LtsClient([daemon.url], cache_dir=cache) as client:
        assert client._read_cached(cached) is None


@pytest.mark.sqlite_only
async def test_a_stopped_first_server_costs_the_client_one_timeout_not_one_per_call(
        daemon: Daemon, tmp_path: Path, vendor: Vendor) -> None:
    """The first server SIGSTOPped (it accepts connections, answers nothing): the first handshake waits for
    it once, the next ones go to the second server at once (lts_client/failover.py)."""
    (tmp_path / "stopped" / "import").mkdir(parents=True)
    stopped = start_daemon(write_config(tmp_path / "stopped", vendor), tmp_path / "stopped")
    stopped.proc.send_signal(signal.SIGSTOP)
    try:
        async with LtsClient([stopped.url, daemon.url], timeout=2) as client:
            took = []
            for _ in range(3):
                started = time.monotonic()
                auth = await client.handshake(handshake_code="216998-L1", client_uuid="dev-s",
                                              product="barcode-reader", deployment_type="browser")
                took.append(time.monotonic() - started)
                assert auth.server == daemon.url
    finally:
        stopped.proc.send_signal(signal.SIGCONT)
        stop_daemon(stopped)
    assert took[0] >= 1.9 and max(took[1:]) < 1.0, took


async def test_client_raises_refusals_with_codes(daemon: Daemon) -> None:
    async with LtsClient([daemon.url]) as client:
        with pytest.raises(LicenseRefused) as err:
            await client.handshake(handshake_code="216998-nope", client_uuid="d", product="barcode-reader",
                                   deployment_type="browser")
    assert (err.value.code, err.value.sdk_code, err.value.status) == (101, -20101, 403)


async def test_client_with_no_reachable_server() -> None:
    async with LtsClient([f"http://127.0.0.1:{free_port()}"], timeout=2) as client:
        with pytest.raises(ServerUnavailable):
            await client.handshake(handshake_code="x-y", client_uuid="d", product="p", deployment_type="browser")


def test_verify_rejects_a_changed_authorization() -> None:
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)).decode()
    raw = b'{"itemId":"a","expiresAt":"2030-01-01T00:00:00Z"}'
    sig = base64.b64encode(key.sign(raw)).decode()
    verify(raw, sig, pub)
    with pytest.raises(BadSignature):
        verify(raw.replace(b"2030", b"2099"), sig, pub)


async def test_standby_refuses_while_the_main_is_up_and_clients_fail_over(tmp_path: Path, vendor: Vendor) -> None:
    main_dir, standby_dir = tmp_path / "main", tmp_path / "standby"
    for folder in (main_dir, standby_dir):
        (folder / "import").mkdir(parents=True)
        (folder / "import" / "a.lic").write_bytes(vendor.issue(license_spec("L1")))
    main = start_daemon(write_config(main_dir, vendor), main_dir)
    standby = start_daemon(write_config(standby_dir, vendor, server={"standby_of": main.url,
                                                                     "standby_check_seconds": 0.2}), standby_dir)
    try:
        body = {"handshakeCode": "216998-L1", "clientUuid": "d", "product": "barcode-reader",
                "deploymentType": "browser"}
        async with aiohttp.ClientSession() as s:
            async with s.post(standby.url + "/api/v1/handshake", json=body) as resp:
                assert resp.status == 503 and (await resp.json())["error"]["code"] == 100
        async with LtsClient([standby.url, main.url]) as client:
            auth = await client.handshake(handshake_code="216998-L1", client_uuid="d", product="barcode-reader",
                                          deployment_type="browser")
            assert auth.server == main.url
        assert stop_daemon(main) == 0
        await asyncio.sleep(1.0)
        async with LtsClient([main.url, standby.url]) as client:
            auth = await client.handshake(handshake_code="216998-L1", client_uuid="d", product="barcode-reader",
                                          deployment_type="browser")
            assert auth.server == standby.url  # the main is down: the standby serves
    finally:
        for d in (main, standby):
            if d.proc.poll() is None:
                stop_daemon(d)
