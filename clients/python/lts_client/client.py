"""An async client for devices and tests: handshake with failover, offline verification, caching.

    async with LtsClient(["https://lts.example.com", "https://lts-standby.example.com"],
                         cache_dir=Path("~/.cache/myapp").expanduser()) as client:
        auth = await client.handshake(handshake_code="216998-100028117", client_uuid=device_id,
                                      product="barcode-reader", deployment_type="desktop")

The authorization's signature is checked against the server's Ed25519 key
before anything is trusted. Pass `public_keys` (keyId -> base64 raw key) to
pin keys; otherwise the key is fetched from /api/v1/server on first contact and
pinned in the cache (trust on first use).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lts_client.protocol import MAC_HEADER, report_mac


class LicenseRefused(Exception):
    """The server answered with a licensing error (101, 120, ...)."""

    def __init__(self, code: int, sdk_code: int | None, message: str, status: int) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.sdk_code = sdk_code
        self.message = message
        self.status = status


class ServerUnavailable(Exception):
    """No server in the list answered usably."""


class BadSignature(Exception):
    pass


class _Envelope(msgspec.Struct):
    authorization: msgspec.Raw
    signature: str
    keyId: str
    reportKey: str


@dataclass(frozen=True)
class Authorization:
    fields: dict[str, Any]
    raw: bytes
    signature: str
    key_id: str
    server: str
    # The key this device MACs its usage reports with (base64); only the device and the server know it.
    report_key: str

    @property
    def authorization_id(self) -> str:
        return self.fields["authorizationId"]

    @property
    def expires_at(self) -> datetime:
        return datetime.fromisoformat(self.fields["expiresAt"].replace("Z", "+00:00"))

    def valid_at(self, now: datetime) -> bool:
        return now < self.expires_at

    @property
    def borrowed_until(self) -> datetime | None:
        """A borrowed authorization's end: the server holds the seat for this device, offline, until then."""
        value = self.fields.get("borrowedUntil")
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def verify(raw: bytes, signature: str, public_key_b64: str) -> None:
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
    try:
        key.verify(base64.b64decode(signature), raw)
    except InvalidSignature:
        raise BadSignature("the authorization's signature does not verify") from None


class LtsClient:
    def __init__(
        self,
        servers: list[str],
        cache_dir: Path | None = None,
        public_keys: dict[str, str] | None = None,
        timeout: float = 5.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if not servers:
            raise ValueError("at least one server URL is needed")
        self.servers = [s.rstrip("/") for s in servers]
        self.cache_dir = cache_dir
        self.public_keys = dict(public_keys or {})
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None
        # (handshake code, client uuid) -> the newest authorization, whose report key signs usage reports.
        self._latest: dict[tuple[str, str], Authorization] = {}
        if cache_dir is not None:
            self.public_keys = {**self._load_json(cache_dir / "keys.json"), **self.public_keys}

    async def __aenter__(self) -> LtsClient:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def handshake(self, *, client_uuid: str, product: str, deployment_type: str,
                        now: datetime | None = None, use_cache: bool = True, **fields: Any) -> Authorization:
        body = {"clientUuid": client_uuid, "product": product, "deploymentType": deployment_type,
                **{_camel(k): v for k, v in fields.items() if v is not None}}
        now = now or datetime.now(UTC)
        cache_file = self._cache_file(body)
        if use_cache and cache_file is not None:
            cached = self._read_cached(cache_file)
            if cached is not None and cached.valid_at(now):
                self._latest[(cached.fields["handshakeCode"], client_uuid)] = cached
                return cached
        errors: list[str] = []
        for url in self.servers:
            try:
                auth = await self._handshake_at(url, body)
            except LicenseRefused as refused:
                if refused.code == 100:  # a standby that will not serve: try the next server
                    errors.append(f"{url}: {refused.message}")
                    continue
                raise
            except (aiohttp.ClientError, TimeoutError, OSError, ServerUnavailable) as e:
                errors.append(f"{url}: {e}")
                continue
            if cache_file is not None:
                self._write_cached(cache_file, auth)
            self._latest[(auth.fields["handshakeCode"], client_uuid)] = auth
            return auth
        raise ServerUnavailable("; ".join(errors))

    async def _handshake_at(self, url: str, body: dict[str, Any]) -> Authorization:
        async with self.session.post(f"{url}/api/v1/handshake", json=body) as resp:
            data = await resp.read()
            if resp.status == 200:
                envelope = msgspec.json.decode(data, type=_Envelope)
                key = await self._public_key(url, envelope.keyId)
                raw = bytes(envelope.authorization)
                verify(raw, envelope.signature, key)
                return Authorization(json.loads(raw), raw, envelope.signature, envelope.keyId, url,
                                     envelope.reportKey)
            if resp.status >= 500 and resp.status != 503:
                raise ServerUnavailable(f"HTTP {resp.status}")
            error = _error(data)
            if resp.status == 503 and error.get("code") != 100:
                raise ServerUnavailable(f"HTTP 503: {error.get('message')}")
            raise LicenseRefused(int(error.get("code", resp.status)), error.get("sdkCode"),
                                 str(error.get("message", "")), resp.status)

    async def _public_key(self, url: str, key_id: str) -> str:
        if key_id in self.public_keys:
            return self.public_keys[key_id]
        async with self.session.get(f"{url}/api/v1/server") as resp:
            resp.raise_for_status()
            info = await resp.json()
        if info.get("keyId") != key_id:
            raise BadSignature(f"server {url} signs with key {info.get('keyId')}, the answer names {key_id}")
        self.public_keys[key_id] = info["publicKey"]
        if self.cache_dir is not None:
            self._write_json(self.cache_dir / "keys.json", self.public_keys)
        return info["publicKey"]

    async def report_usage(self, report: dict[str, Any], authorization: Authorization | None = None) -> dict[str, Any]:
        """Send one usage report (see docs/api.md), MACed with the report key of the device's newest
        authorization for the report's code (or of `authorization`); tries each server in turn."""
        auth = authorization or self._latest.get((report["handshakeCode"], report["clientUuid"]))
        if auth is None:
            raise ValueError(f"no authorization of device {report['clientUuid']} for {report['handshakeCode']}: "
                             "handshake first; a usage report is signed with its report key")
        body = json.dumps(report, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json",
                   MAC_HEADER: report_mac(base64.b64decode(auth.report_key), body)}
        errors = []
        for url in self.servers:
            try:
                async with self.session.post(f"{url}/api/v1/usage", data=body, headers=headers) as resp:
                    data = await resp.read()
                    if resp.status == 200:
                        return json.loads(data)
                    if resp.status >= 500:
                        errors.append(f"{url}: HTTP {resp.status}")
                        continue
                    error = _error(data)
                    raise LicenseRefused(int(error.get("code", resp.status)), error.get("sdkCode"),
                                         str(error.get("message", "")), resp.status)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                errors.append(f"{url}: {e}")
        raise ServerUnavailable("; ".join(errors))

    # -- borrowing (offline checkout) ----------------------------------------

    async def borrow(self, *, client_uuid: str, product: str, deployment_type: str, days: int,
                     now: datetime | None = None, **fields: Any) -> Authorization:
        """Take the seat offline for `days` days (at most the item's, or the code's, borrowMaxDays).

        The server holds the seat until the authorization's `borrowed_until`; the cache keeps the
        authorization across restarts, filed under the same request without borrowing, so `handshake()`
        with the same fields answers from it while the device is offline. `return_borrowed()` gives it back.
        """
        auth = await self.handshake(client_uuid=client_uuid, product=product, deployment_type=deployment_type,
                                    now=now, use_cache=False, borrow_days=days, **fields)
        plain = {"clientUuid": client_uuid, "product": product, "deploymentType": deployment_type,
                 **{_camel(k): v for k, v in fields.items() if v is not None}}
        cache_file = self._cache_file(plain)
        if cache_file is not None:
            self._write_cached(cache_file, auth)
        return auth

    def borrowed(self, now: datetime | None = None) -> list[Authorization]:
        """The borrowed authorizations in the cache that still run (after a restart too)."""
        now = now or datetime.now(UTC)
        found: dict[str, Authorization] = {}
        for path in sorted(self.cache_dir.glob("auth-*.json")) if self.cache_dir is not None else ():
            auth = self._read_cached(path)
            if auth is not None and auth.borrowed_until is not None and auth.borrowed_until > now:
                found[auth.authorization_id] = auth
        return list(found.values())

    async def return_borrowed(self, authorization: Authorization) -> dict[str, Any]:
        """Give a borrowed seat back before `borrowed_until` (POST /api/v1/handshake/return, signed with the
        authorization's report key; a repeat is harmless) and drop it from the cache."""
        body = json.dumps({"clientUuid": authorization.fields["clientUuid"],
                           "handshakeCode": authorization.fields["handshakeCode"]}, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json",
                   MAC_HEADER: report_mac(base64.b64decode(authorization.report_key), body)}
        errors = []
        servers = [authorization.server, *(u for u in self.servers if u != authorization.server)]
        for url in servers:
            try:
                async with self.session.post(f"{url}/api/v1/handshake/return", data=body, headers=headers) as resp:
                    data = await resp.read()
                    if resp.status == 200:
                        self._forget(authorization)
                        return json.loads(data)
                    if resp.status >= 500:
                        errors.append(f"{url}: HTTP {resp.status}")
                        continue
                    error = _error(data)
                    raise LicenseRefused(int(error.get("code", resp.status)), error.get("sdkCode"),
                                         str(error.get("message", "")), resp.status)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                errors.append(f"{url}: {e}")
        raise ServerUnavailable("; ".join(errors))

    def _forget(self, authorization: Authorization) -> None:
        """Drop every cached copy of the authorization (the device handshakes online next time)."""
        for key, latest in list(self._latest.items()):
            if latest.authorization_id == authorization.authorization_id:
                del self._latest[key]
        for path in self.cache_dir.glob("auth-*.json") if self.cache_dir is not None else ():
            cached = self._read_cached(path)
            if cached is not None and cached.authorization_id == authorization.authorization_id:
                path.unlink(missing_ok=True)

    # -- the authorization cache --------------------------------------------

    def _cache_file(self, body: dict[str, Any]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = json.dumps({k: v for k, v in body.items() if k != "sessionPassword"}, sort_keys=True)
        return self.cache_dir / f"auth-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def _read_cached(self, path: Path) -> Authorization | None:
        data = self._load_json(path)
        if not data:
            return None
        try:
            raw = base64.b64decode(data["raw"])
            key = self.public_keys.get(data["keyId"])
            if key is None:
                return None
            verify(raw, data["signature"], key)  # a cache file edited by hand is worthless
            return Authorization(json.loads(raw), raw, data["signature"], data["keyId"], data["server"],
                                 data["reportKey"])
        except (KeyError, ValueError, BadSignature):
            return None

    def _write_cached(self, path: Path, auth: Authorization) -> None:
        self._write_json(path, {"raw": base64.b64encode(auth.raw).decode(), "signature": auth.signature,
                                "keyId": auth.key_id, "server": auth.server, "reportKey": auth.report_key})

    @staticmethod
    def _load_json(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _write_json(path: Path, data: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        # Owner-only: a cached authorization holds the device's report key.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data))
        tmp.replace(path)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _error(data: bytes) -> dict[str, Any]:
    try:
        return json.loads(data).get("error", {})
    except (ValueError, AttributeError):
        return {"message": data[:200].decode(errors="replace")}
