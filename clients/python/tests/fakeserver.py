"""A fake lts-server for the client's tests: aiohttp, test keys, realistic answers. No lts-server anywhere."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lts_client.protocol import MAC_HEADER
from lts_client.trust import BoundItem, binding_statement, key_id

REPORT_KEY = base64.b64encode(b"k" * 32).decode()


def raw_b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw)).decode()


def kid(key: Ed25519PrivateKey) -> str:
    return key_id(base64.b64decode(raw_b64(key)))


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class FakeServer:
    """Answers handshakes as lts-server does: an authorization signed by `key`, bound by `vendor` when given."""

    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    vendor: Ed25519PrivateKey | None = None
    server_uuid: str = "0feb6cf8-698d-47b4-8f64-dc3580f5a7a9"
    lifetime: timedelta = timedelta(hours=1)
    refresh: timedelta | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    # Changes applied to the authorization before it is signed (what a forger or a buggy server sends).
    alter: dict[str, Any] = field(default_factory=dict)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    # An error to answer with instead: (HTTP status, code).
    refuse: tuple[int, int] | None = None
    # Borrow returns received (body, MAC header), and the error to answer them with, if any.
    returns: list[tuple[bytes, str]] = field(default_factory=list)
    refuse_return: tuple[int, int] | None = None
    url: str = ""

    @property
    def key_id(self) -> str:
        return kid(self.key)

    @property
    def public_b64(self) -> str:
        return raw_b64(self.key)

    def statement(self, item: dict[str, Any]) -> bytes:
        now = self.clock()
        return binding_statement(
            license_id="L1", revision=1, organization_id="216998", server_uuid=self.server_uuid,
            server_key=self.public_b64, issued_at=iso(now - timedelta(days=30)),
            items=[BoundItem(item_id="L1-1", product=item["product"], deployment_type=item["deploymentType"],
                             license_type="per-device", starts_at=iso(now - timedelta(days=30)),
                             expires_at=iso(now + timedelta(days=300)))])

    def answer(self, body: dict[str, Any]) -> bytes:
        now = self.clock()
        fields: dict[str, Any] = {
            "authorizationId": f"a{len(self.calls)}", "serverUuid": self.server_uuid,
            "handshakeCode": body.get("handshakeCode") or "216998-L1", "organizationId": "216998",
            "itemId": "L1-1", "licenseId": "L1", "product": body["product"],
            "deploymentType": body["deploymentType"], "licenseType": "per-device",
            "clientUuid": body["clientUuid"], "issuedAt": iso(now), "expiresAt": iso(now + self.lifetime),
            "refreshBy": iso(now + (self.refresh or self.lifetime)),
        }
        if "borrowDays" in body:  # a borrow: valid offline, and the seat held, until borrowedUntil
            until = now + timedelta(days=body["borrowDays"])
            fields.update(expiresAt=iso(until), borrowedUntil=iso(until))
        binding = b""
        if self.vendor is not None:
            statement = self.statement(fields)
            fields["bindingSha256"] = hashlib.sha256(statement).hexdigest()
            binding = (b',"binding":' + json.dumps({
                "keyId": kid(self.vendor), "statement": base64.b64encode(statement).decode(),
                "signature": base64.b64encode(self.vendor.sign(statement)).decode()}).encode())
        fields.update(self.alter)
        auth = json.dumps(fields, separators=(",", ":")).encode()
        signature = base64.b64encode(self.key.sign(auth)).decode()
        return (b'{"authorization":' + auth + b',"signature":"' + signature.encode() + b'","keyId":"'
                + self.key_id.encode() + b'","reportKey":"' + REPORT_KEY.encode() + b'"' + binding + b"}")

    async def handshake(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(body)
        if self.refuse is not None:
            status, code = self.refuse
            return web.json_response({"error": {"code": code, "sdkCode": -20000 - code, "message": f"refused {code}"}},
                                     status=status)
        return web.Response(body=self.answer(body), content_type="application/json")

    async def give_back(self, request: web.Request) -> web.Response:
        self.returns.append((await request.read(), request.headers.get(MAC_HEADER, "")))
        if self.refuse_return is not None:
            status, code = self.refuse_return
            return web.json_response({"error": {"code": code, "sdkCode": -20000 - code, "message": "not borrowed"}},
                                     status=status)
        return web.json_response({"returned": True, "released": len(self.returns) == 1})

    async def info(self, _: web.Request) -> web.Response:
        return web.json_response({"serverUuid": self.server_uuid, "keyId": self.key_id, "publicKey": self.public_b64})


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Any]]:
    """Starts a FakeServer (or an app with a custom handshake handler); returns it with its url set."""
    servers: list[TestServer] = []

    async def run(fake: FakeServer | None = None, usage: Callable[[web.Request], Any] | None = None) -> FakeServer:
        fake = fake or FakeServer()
        app = web.Application()
        app.router.add_post("/api/v1/handshake", fake.handshake)
        app.router.add_get("/api/v1/server", fake.info)
        app.router.add_post("/api/v1/handshake/return", fake.give_back)
        if usage is not None:
            app.router.add_post("/api/v1/usage", usage)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        fake.url = str(server.make_url("")).rstrip("/")
        return fake

    yield run
    for server in servers:
        await server.close()


REQUEST = {"handshake_code": "216998-L1", "client_uuid": "dev-1", "product": "barcode-reader",
           "deployment_type": "desktop"}
