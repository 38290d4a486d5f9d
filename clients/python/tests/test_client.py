"""lts-client on its own: a fake server made with aiohttp and a test key, no lts-server anywhere."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lts_client import MAC_HEADER, BadSignature, LicenseRefused, LtsClient, ServerUnavailable, report_mac, verify

CLIENT_ROOT = Path(__file__).resolve().parents[1]
KEY = Ed25519PrivateKey.generate()
PUBLIC_B64 = base64.b64encode(KEY.public_key().public_bytes(serialization.Encoding.Raw,
                                                            serialization.PublicFormat.Raw)).decode()
KEY_ID = "testkey000000001"
REPORT_KEY = base64.b64encode(b"k" * 32).decode()


def grant(body: dict[str, Any], expires: datetime, **extra: Any) -> bytes:
    auth = json.dumps({"authorizationId": "a1", "handshakeCode": body["handshakeCode"],
                       "clientUuid": body["clientUuid"], "product": body["product"],
                       "expiresAt": expires.isoformat().replace("+00:00", "Z"), **extra}).encode()
    signature = base64.b64encode(KEY.sign(auth)).decode()
    return (b'{"authorization":' + auth + b',"signature":"' + signature.encode() + b'","keyId":"' + KEY_ID.encode()
            + b'","reportKey":"' + REPORT_KEY.encode() + b'"}')


Handler = Callable[[web.Request], Any]


async def server_info(_: web.Request) -> web.Response:
    return web.json_response({"keyId": KEY_ID, "publicKey": PUBLIC_B64})


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Any]]:
    servers: list[TestServer] = []

    async def start(handshake: Handler, usage: Handler | None = None, returns: Handler | None = None) -> str:
        app = web.Application()
        app.router.add_post("/api/v1/handshake", handshake)
        if usage is not None:
            app.router.add_post("/api/v1/usage", usage)
        if returns is not None:
            app.router.add_post("/api/v1/handshake/return", returns)
        app.router.add_get("/api/v1/server", server_info)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


def granting(calls: list[dict[str, Any]]) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append(body)
        return web.Response(body=grant(body, datetime.now(UTC) + timedelta(hours=1)), content_type="application/json")
    return handler


def refusing(status: int, code: int, message: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": code, "sdkCode": -20000 - code, "message": message}},
                                 status=status)
    return handler


REQUEST = {"handshake_code": "216998-1", "client_uuid": "dev-1", "product": "barcode-reader",
           "deployment_type": "desktop"}


async def test_handshake_verifies_the_signature_and_sends_camel_case_fields(serve: Any) -> None:
    calls: list[dict[str, Any]] = []
    url = await serve(granting(calls))
    async with LtsClient([url], public_keys={KEY_ID: PUBLIC_B64}) as client:
        auth = await client.handshake(**REQUEST, session_password="pw")
    assert auth.fields["clientUuid"] == "dev-1"
    assert auth.report_key == REPORT_KEY
    assert calls == [{"handshakeCode": "216998-1", "clientUuid": "dev-1", "product": "barcode-reader",
                      "deploymentType": "desktop", "sessionPassword": "pw"}]


async def test_a_forged_signature_is_refused(serve: Any) -> None:
    async def forged(request: web.Request) -> web.Response:
        body = await request.json()
        answer = json.loads(grant(body, datetime.now(UTC) + timedelta(hours=1)))
        answer["authorization"]["product"] = "something-else"
        return web.json_response(answer)
    url = await serve(forged)
    async with LtsClient([url], public_keys={KEY_ID: PUBLIC_B64}) as client:
        with pytest.raises(BadSignature):
            await client.handshake(**REQUEST)


async def test_refusals_carry_the_code_and_a_standby_passes_to_the_next_server(serve: Any) -> None:
    calls: list[dict[str, Any]] = []
    standby = await serve(refusing(503, 100, "standby"))
    refusing_main = await serve(refusing(403, 120, "usage exceeded"))
    good = await serve(granting(calls))
    async with LtsClient([standby, refusing_main, good], public_keys={KEY_ID: PUBLIC_B64}) as client:
        with pytest.raises(LicenseRefused) as refused:
            await client.handshake(**REQUEST)
        assert (refused.value.code, refused.value.sdk_code, refused.value.status) == (120, -20120, 403)
    async with LtsClient([standby, good], public_keys={KEY_ID: PUBLIC_B64}) as client:
        assert (await client.handshake(**REQUEST)).server == good


async def test_no_server_answering_is_server_unavailable() -> None:
    async with LtsClient(["http://127.0.0.1:9"], timeout=1) as client:
        with pytest.raises(ServerUnavailable):
            await client.handshake(**REQUEST)


async def test_the_cache_answers_offline_and_is_owner_only(serve: Any, tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []
    url = await serve(granting(calls))
    async with LtsClient([url], cache_dir=tmp_path, public_keys={KEY_ID: PUBLIC_B64}) as client:
        first = await client.handshake(**REQUEST)
    async with LtsClient(["http://127.0.0.1:9"], cache_dir=tmp_path, public_keys={KEY_ID: PUBLIC_B64}) as offline:
        again = await offline.handshake(**REQUEST)
    assert again.raw == first.raw and len(calls) == 1
    cached = [p for p in tmp_path.iterdir() if p.name.startswith("auth-")]
    assert cached and all(p.stat().st_mode & 0o777 == 0o600 for p in cached)


async def test_usage_reports_carry_the_mac_of_their_bytes(serve: Any) -> None:
    seen: list[tuple[bytes, str]] = []

    async def usage(request: web.Request) -> web.Response:
        seen.append((await request.read(), request.headers[MAC_HEADER]))
        return web.json_response({"accepted": 1})
    url = await serve(granting([]), usage)
    async with LtsClient([url], public_keys={KEY_ID: PUBLIC_B64}) as client:
        await client.handshake(**REQUEST)
        assert await client.report_usage({"handshakeCode": "216998-1", "clientUuid": "dev-1", "records": []}) \
            == {"accepted": 1}
    body, mac = seen[0]
    assert mac == report_mac(base64.b64decode(REPORT_KEY), body)


def test_verify_refuses_one_changed_byte() -> None:
    raw = b'{"a":1}'
    signature = base64.b64encode(KEY.sign(raw)).decode()
    verify(raw, signature, PUBLIC_B64)
    with pytest.raises(BadSignature):
        verify(b'{"a":2}', signature, PUBLIC_B64)


def test_the_library_works_where_the_server_is_not_installed() -> None:
    """A device has lts-client and none of lts-server: importing and using it must not reach for lts_server."""
    blocker = ("import sys\n"
               "class NoServer:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'lts_server':\n"
               "            raise ImportError('lts_server is not installed on a device')\n"
               "sys.meta_path.insert(0, NoServer())\n"
               "import lts_client, lts_client.client, lts_client.protocol\n"
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


async def test_a_borrowed_authorization_stays_in_the_cache_across_restarts_until_returned(
        serve: Any, tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []
    returns: list[tuple[bytes, str]] = []

    async def handshake(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append(body)
        if "borrowDays" in body:
            until = (datetime.now(UTC) + timedelta(days=body["borrowDays"])).isoformat().replace("+00:00", "Z")
            data = grant(body, datetime.now(UTC) + timedelta(days=body["borrowDays"]), borrowedUntil=until)
        else:
            data = grant(body, datetime.now(UTC) + timedelta(hours=1))
        return web.Response(body=data, content_type="application/json")

    async def give_back(request: web.Request) -> web.Response:
        returns.append((await request.read(), request.headers[MAC_HEADER]))
        return web.json_response({"returned": True, "released": len(returns) == 1})

    url = await serve(handshake, returns=give_back)
    async with LtsClient([url], cache_dir=tmp_path, public_keys={KEY_ID: PUBLIC_B64}) as client:
        borrowed = await client.borrow(**REQUEST, days=7)
    assert calls[-1]["borrowDays"] == 7
    assert borrowed.borrowed_until is not None and borrowed.borrowed_until > datetime.now(UTC) + timedelta(days=6)
    # A restart, offline: the same request is answered from the cache, and the borrow is listed.
    async with LtsClient(["http://127.0.0.1:9"], cache_dir=tmp_path, public_keys={KEY_ID: PUBLIC_B64},
                         timeout=1) as offline:
        again = await offline.handshake(**REQUEST)
        assert again.raw == borrowed.raw
        [listed] = offline.borrowed()
        assert listed.raw == borrowed.raw
    assert len(calls) == 1
    # Back online after a restart: the return is signed with the cached report key, and the cache forgets it.
    async with LtsClient([url], cache_dir=tmp_path, public_keys={KEY_ID: PUBLIC_B64}) as online:
        [listed] = online.borrowed()
        assert (await online.return_borrowed(listed))["released"] is True
        assert online.borrowed() == []
        fresh = await online.handshake(**REQUEST)
    assert fresh.borrowed_until is None and len(calls) == 2
    body, mac = returns[0]
    assert json.loads(body) == {"clientUuid": "dev-1", "handshakeCode": "216998-1"}
    assert mac == report_mac(base64.b64decode(REPORT_KEY), body)


async def test_a_refused_return_raises_with_the_code(serve: Any, tmp_path: Path) -> None:
    async def handshake(request: web.Request) -> web.Response:
        body = await request.json()
        return web.Response(body=grant(body, datetime.now(UTC) + timedelta(days=1),
                                       borrowedUntil=(datetime.now(UTC) + timedelta(days=1)).isoformat()),
                            content_type="application/json")

    url = await serve(handshake, returns=refusing(409, 409, "not borrowed"))
    async with LtsClient([url], cache_dir=tmp_path, public_keys={KEY_ID: PUBLIC_B64}) as client:
        auth = await client.borrow(**REQUEST, days=1)
        with pytest.raises(LicenseRefused) as refused:
            await client.return_borrowed(auth)
        assert refused.value.status == 409
        assert client.borrowed(), "a refused return keeps the borrow in the cache"
