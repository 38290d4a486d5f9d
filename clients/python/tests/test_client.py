"""lts-client on its own: a fake server made with aiohttp and test keys, no lts-server anywhere."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fakeserver import REPORT_KEY, REQUEST, FakeServer, kid, raw_b64, start  # noqa: F401 - start is a fixture

from lts_client import (
    MAC_HEADER,
    BadSignature,
    LicenseRefused,
    LtsClient,
    ServerUnavailable,
    Trust,
    UntrustedKey,
    report_mac,
    verify,
)

CLIENT_ROOT = Path(__file__).resolve().parents[1]


def pinned(fake: FakeServer) -> dict[str, str]:
    return {fake.key_id: fake.public_b64}


async def test_handshake_verifies_the_signature_and_sends_camel_case_fields(start: Any) -> None:
    fake = await start()
    async with LtsClient([fake.url], public_keys=pinned(fake), device_fingerprint=None) as client:
        auth = await client.handshake(**REQUEST, session_password="pw")
    assert auth.fields["clientUuid"] == "dev-1"
    assert auth.report_key == REPORT_KEY
    assert auth.trust is Trust.PINNED
    assert fake.calls == [{"handshakeCode": "216998-L1", "clientUuid": "dev-1", "product": "barcode-reader",
                           "deploymentType": "desktop", "sessionPassword": "pw"}]


async def test_the_device_fingerprint_is_sent_when_given(start: Any) -> None:
    fake = await start()
    async with LtsClient([fake.url], public_keys=pinned(fake), device_fingerprint="fp-1") as client:
        await client.handshake(**REQUEST)
    assert fake.calls[0]["deviceFingerprint"] == "fp-1"


async def test_a_forged_signature_is_refused(start: Any) -> None:
    fake = await start()
    honest = fake.answer

    def forged(body: dict[str, Any]) -> bytes:
        answer = json.loads(honest(body))
        answer["authorization"]["product"] = "something-else"
        return json.dumps(answer).encode()

    fake.answer = forged  # type: ignore[method-assign]
    async with LtsClient([fake.url], public_keys=pinned(fake)) as client:
        with pytest.raises(BadSignature):
            await client.handshake(**REQUEST)


async def test_refusals_carry_the_code_and_a_standby_passes_to_the_next_server(start: Any) -> None:
    key = Ed25519PrivateKey.generate()
    standby = await start(FakeServer(key=key, refuse=(503, 100)))
    refusing_main = await start(FakeServer(key=key, refuse=(403, 120)))
    good = await start(FakeServer(key=key))
    async with LtsClient([standby.url, refusing_main.url, good.url], public_keys=pinned(good)) as client:
        with pytest.raises(LicenseRefused) as refused:
            await client.handshake(**REQUEST)
        assert (refused.value.code, refused.value.sdk_code, refused.value.status) == (120, -20120, 403)
    async with LtsClient([standby.url, good.url], public_keys=pinned(good)) as client:
        assert (await client.handshake(**REQUEST)).server == good.url


async def test_a_server_whose_clock_is_behind_passes_to_the_next_server(start: Any) -> None:
    key = Ed25519PrivateKey.generate()
    behind = await start(FakeServer(key=key, refuse=(503, 160)))
    good = await start(FakeServer(key=key))
    async with LtsClient([behind.url, good.url], public_keys=pinned(good)) as client:
        assert (await client.handshake(**REQUEST)).server == good.url
    async with LtsClient([behind.url], public_keys=pinned(good)) as client:
        with pytest.raises(ServerUnavailable, match="160"):
            await client.handshake(**REQUEST)


async def test_no_server_answering_is_server_unavailable() -> None:
    async with LtsClient(["http://127.0.0.1:9"], timeout=1) as client:
        with pytest.raises(ServerUnavailable):
            await client.handshake(**REQUEST)


async def test_the_cache_answers_offline_and_is_owner_only(start: Any, tmp_path: Path) -> None:
    fake = await start()
    cache = tmp_path / "cache"
    async with LtsClient([fake.url], cache_dir=cache, public_keys=pinned(fake)) as client:
        first = await client.handshake(**REQUEST)
    async with LtsClient(["http://127.0.0.1:9"], cache_dir=cache, public_keys=pinned(fake)) as offline:
        again = await offline.handshake(**REQUEST)
    assert again.raw == first.raw and len(fake.calls) == 1
    # The folder given as a str, as a device's config file would give it.
    async with LtsClient(["http://127.0.0.1:9"], cache_dir=str(cache), public_keys=pinned(fake)) as offline:
        assert (await offline.handshake(**REQUEST)).raw == first.raw
    assert cache.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in cache.iterdir())
    assert any(p.name.startswith("auth-") for p in cache.iterdir())


async def test_usage_reports_carry_the_mac_of_their_bytes(start: Any) -> None:
    seen: list[tuple[bytes, str]] = []

    async def usage(request: web.Request) -> web.Response:
        seen.append((await request.read(), request.headers[MAC_HEADER]))
        return web.json_response({"accepted": 1})
    fake = await start(usage=usage)
    async with LtsClient([fake.url], public_keys=pinned(fake)) as client:
        await client.handshake(**REQUEST)
        assert await client.report_usage({"handshakeCode": "216998-L1", "clientUuid": "dev-1", "records": []}) \
            == {"accepted": 1}
    body, mac = seen[0]
    assert mac == report_mac(base64.b64decode(REPORT_KEY), body)


async def test_first_use_pins_each_servers_key_and_refuses_another_later(start: Any, tmp_path: Path) -> None:
    fake = await start()
    cache = tmp_path / "cache"
    async with LtsClient([fake.url], cache_dir=cache) as client:
        auth = await client.handshake(**REQUEST)
    assert auth.trust is Trust.FIRST_USE
    learned = json.loads((cache / "keys.json").read_text())
    assert learned == {"firstUse": {fake.url: {fake.key_id: fake.public_b64}}}
    fake.key = Ed25519PrivateKey.generate()  # the same address now answers with another key
    async with LtsClient([fake.url], cache_dir=cache) as client:
        with pytest.raises(UntrustedKey):
            await client.handshake(**REQUEST, use_cache=False)
    assert json.loads((cache / "keys.json").read_text()) == learned


def test_verify_refuses_one_changed_byte() -> None:
    key = Ed25519PrivateKey.generate()
    raw = b'{"a":1}'
    signature = base64.b64encode(key.sign(raw)).decode()
    verify(raw, signature, raw_b64(key))
    with pytest.raises(BadSignature):
        verify(b'{"a":2}', signature, raw_b64(key))


def test_a_key_id_is_the_sha256_prefix_of_the_raw_key() -> None:
    key = Ed25519PrivateKey.generate()
    import hashlib
    assert kid(key) == hashlib.sha256(base64.b64decode(raw_b64(key))).hexdigest()[:16]


def test_the_library_works_where_the_server_is_not_installed() -> None:
    """A device has lts-client and none of lts-server: importing and using it must not reach for lts_server."""
    blocker = ("import sys\n"
               "class NoServer:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'lts_server':\n"
               "            raise ImportError('lts_server is not installed on a device')\n"
               "sys.meta_path.insert(0, NoServer())\n"
               "import lts_client, lts_client.client, lts_client.protocol, lts_client.trust, lts_client.fingerprint\n"
               "print(lts_client.report_mac(b'k', b'body'))\n")
    env = {**os.environ, "PYTHONPATH": str(CLIENT_ROOT)}
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == report_mac(b"k", b"body")


def test_the_distribution_declares_no_dependency_on_the_server() -> None:
    project = tomllib.loads((CLIENT_ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "lts-client"
    names = [re.split(r"[<>=!~ \[;]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]]
    assert names and not any(name.startswith("lts") for name in names)


async def test_a_refusal_ends_the_cached_authorization(start: Any, tmp_path: Path) -> None:
    """Past refreshBy the device asks again; when the server now refuses (its seat was released and the item
    is full), the cached authorization is dropped instead of being used on."""
    now = datetime.now(UTC)
    fake = await start(FakeServer(lifetime=timedelta(days=30), refresh=timedelta(hours=1)))
    cache = tmp_path / "cache"
    async with LtsClient([fake.url], cache_dir=cache, public_keys=pinned(fake)) as client:
        first = await client.handshake(**REQUEST, now=now)
        assert (await client.handshake(**REQUEST, now=now + timedelta(minutes=30))).raw == first.raw
        assert len(fake.calls) == 1
        fake.refuse = (403, 120)
        with pytest.raises(LicenseRefused):
            await client.handshake(**REQUEST, now=now + timedelta(hours=2))
    assert not list(cache.glob("auth-*"))


async def test_past_refresh_by_an_unreachable_server_leaves_the_cache_in_use(start: Any, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    fake = await start(FakeServer(lifetime=timedelta(days=30), refresh=timedelta(hours=1)))
    cache = tmp_path / "cache"
    async with LtsClient([fake.url], cache_dir=cache, public_keys=pinned(fake)) as client:
        first = await client.handshake(**REQUEST, now=now)
    async with LtsClient(["http://127.0.0.1:9"], cache_dir=cache, public_keys=pinned(fake), timeout=1) as offline:
        assert (await offline.handshake(**REQUEST, now=now + timedelta(days=2))).raw == first.raw
        with pytest.raises(ServerUnavailable):  # ... until it expires
            await offline.handshake(**REQUEST, now=now + timedelta(days=31))


async def test_a_borrowed_authorization_stays_in_the_cache_across_restarts_until_returned(
        start: Any, tmp_path: Path) -> None:
    fake = await start()
    async with LtsClient([fake.url], cache_dir=tmp_path, public_keys=pinned(fake), device_fingerprint=None) as client:
        borrowed = await client.borrow(**REQUEST, days=7)
    assert fake.calls[-1]["borrowDays"] == 7
    assert borrowed.borrowed_until is not None and borrowed.borrowed_until > datetime.now(UTC) + timedelta(days=6)
    # A restart, offline: the same request is answered from the cache, and the borrow is listed.
    async with LtsClient(["http://127.0.0.1:9"], cache_dir=tmp_path, public_keys=pinned(fake), timeout=1,
                         device_fingerprint=None) as offline:
        again = await offline.handshake(**REQUEST)
        assert again.raw == borrowed.raw
        [listed] = offline.borrowed()
        assert listed.raw == borrowed.raw
    assert len(fake.calls) == 1
    # Back online after a restart: the return is signed with the cached report key, and the cache forgets it.
    async with LtsClient([fake.url], cache_dir=tmp_path, public_keys=pinned(fake), device_fingerprint=None) as online:
        [listed] = online.borrowed()
        assert (await online.return_borrowed(listed))["released"] is True
        assert online.borrowed() == []
        fresh = await online.handshake(**REQUEST)
    assert fresh.borrowed_until is None and len(fake.calls) == 2
    body, mac = fake.returns[0]
    assert json.loads(body) == {"clientUuid": "dev-1", "handshakeCode": "216998-L1"}
    assert mac == report_mac(base64.b64decode(REPORT_KEY), body)


async def test_a_refused_return_raises_with_the_code(start: Any, tmp_path: Path) -> None:
    fake = await start(FakeServer(refuse_return=(409, 409)))
    async with LtsClient([fake.url], cache_dir=tmp_path, public_keys=pinned(fake)) as client:
        auth = await client.borrow(**REQUEST, days=1)
        with pytest.raises(LicenseRefused) as refused:
            await client.return_borrowed(auth)
        assert refused.value.status == 409
        assert client.borrowed(), "a refused return keeps the borrow in the cache"
