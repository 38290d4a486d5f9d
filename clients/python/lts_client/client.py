"""An async client for devices and tests: handshake with failover, offline verification, caching.

    async with LtsClient(["https://lts.example.com", "https://lts-standby.example.com"],
                         vendor_keys={"f22983345d3afc83": VENDOR_PUBLIC_KEY_B64},
                         cache_dir=Path("~/.cache/myapp").expanduser()) as client:
        auth = await client.handshake(handshake_code="216998-100028117", client_uuid=device_id,
                                      product="barcode-reader", deployment_type="desktop")

Nothing in an answer is trusted before it passed every check of lts_client.trust: whose key
signed it, the signature, the vendor's binding, that it is for what was asked, and when.
How the server's key is trusted (`Authorization.trust`):

- `vendor_keys` (keyId -> base64 raw key or PEM): the vendor's key, which the product ships with;
  an answer's binding (signed by the vendor) names the server and its identity key ("vendor");
- `public_keys` (keyId -> base64): the server's own key, given; the client never fetches or
  accepts another one ("pinned");
- neither: the key is fetched from /api/v1/server at the first contact with each server and
  pinned in the cache for that server ("first-use"); another key from that server later is refused.

An answer that fails any check raises BadSignature (or the subclass that says why) and writes
nothing to `cache_dir`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lts_client import trust
from lts_client.failover import Failover
from lts_client.fingerprint import device_fingerprint
from lts_client.protocol import MAC_HEADER, report_mac
from lts_client.trust import (
    DEFAULT_TOLERANCE,
    BadBinding,
    BadSignature,
    BindingEnvelope,
    NotRequested,
    OutsideValidity,
    Trust,
    UntrustedKey,
)

__all__ = ["Authorization", "BadBinding", "BadSignature", "LicenseRefused", "LtsClient", "NotRequested",
           "OutsideValidity", "ServerUnavailable", "Trust", "UntrustedKey", "verify"]

# Codes after which the next server in the list is tried: a standby that will not serve (100), a server
# whose clock is behind its own records (160).
NEXT_SERVER = (100, 160)
AUTO = "auto"
# Request fields that say how to ask, not what for: the answer to a borrow or a wait is the answer to the same
# request without them, so the cache files it there and handshake() with the same fields finds it.
HOW_TO_ASK = ("borrowDays", "waitSeconds")


class LicenseRefused(Exception):
    """The server answered with a licensing error (101, 120, ...)."""

    def __init__(self, code: int, sdk_code: int | None, message: str, status: int,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.sdk_code = sdk_code
        self.message = message
        self.status = status
        # The refusal's other fields, as the server sent them: queuePosition (a wait for a seat ran out),
        # queueFull, versions, field, ...
        self.details = details or {}

    @classmethod
    def from_error(cls, error: dict[str, Any], status: int) -> LicenseRefused:
        return cls(int(error.get("code", status)), error.get("sdkCode"), str(error.get("message", "")), status,
                   {k: v for k, v in error.items() if k not in ("code", "sdkCode", "message")})


class ServerUnavailable(Exception):
    """No server in the list answered usably."""


@dataclass(frozen=True)
class Authorization:
    fields: dict[str, Any]
    raw: bytes
    signature: str
    key_id: str
    server: str
    # The key this device MACs its usage reports with (base64); only the device and the server know it.
    report_key: str
    # How the signing key was trusted: "vendor", "pinned" or "first-use" (lts_client.trust.Trust).
    trust: Trust = Trust.PINNED
    # The vendor's binding the answer carried (trust "vendor" rests on it), or None.
    binding: BindingEnvelope | None = None

    @property
    def authorization_id(self) -> str:
        return self.fields["authorizationId"]

    @property
    def issued_at(self) -> datetime:
        return _when(self.fields["issuedAt"])

    @property
    def expires_at(self) -> datetime:
        return _when(self.fields["expiresAt"])

    @property
    def refresh_by(self) -> datetime:
        """When the device should ask the server again (it may run on this one until expires_at offline)."""
        value = self.fields.get("refreshBy")
        return _when(value) if value else self.expires_at

    def valid_at(self, now: datetime) -> bool:
        return now < self.expires_at

    @property
    def borrowed_until(self) -> datetime | None:
        """A borrowed authorization's end: the server holds the seat for this device, offline, until then."""
        value = self.fields.get("borrowedUntil")
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


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
        cache_dir: Path | str | None = None,
        public_keys: dict[str, str] | None = None,
        timeout: float = 5.0,
        session: aiohttp.ClientSession | None = None,
        vendor_keys: dict[str, str] | None = None,
        server_uuids: Iterable[str] | None = None,
        clock_tolerance: timedelta = DEFAULT_TOLERANCE,
        device_fingerprint: str | None = AUTO,
    ) -> None:
        """`server_uuids`: when given, authorizations naming another server are refused. `device_fingerprint`:
        sent with every handshake (clone detection); "auto" derives one (lts_client.fingerprint), None sends none."""
        if not servers:
            raise ValueError("at least one server URL is needed")
        cache_dir = Path(cache_dir) if cache_dir is not None else None  # a str path works too
        self.servers = [s.rstrip("/") for s in servers]
        # Servers that failed lately are asked after the others (lts_client/failover.py).
        self.failover = Failover(self.servers)
        self.cache_dir = cache_dir
        self.public_keys = dict(public_keys or {})
        self.vendor_keys = dict(vendor_keys or {})
        self._pinned = trust.keyring(self.public_keys, "public_keys")
        self._vendors = trust.keyring(self.vendor_keys, "vendor_keys")
        self.server_uuids = set(server_uuids or ())
        self.clock_tolerance = clock_tolerance
        self.fingerprint = _fingerprint() if device_fingerprint == AUTO else device_fingerprint
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None
        # (handshake code, client uuid) -> the newest authorization, whose report key signs usage reports.
        self._latest: dict[tuple[str, str], Authorization] = {}
        # Keys learned on first use, per server URL (only when no key of any kind was given).
        self._learned: dict[str, dict[str, str]] = {}
        self._newest_time: datetime | None = None
        if cache_dir is not None and self.first_use:
            self._learned = _read_learned(self._load_json(cache_dir / "keys.json"), self.servers)
        if cache_dir is not None:
            seen = self._load_json(cache_dir / "clock.json").get("newestServerTime")
            try:
                self._newest_time = _when(seen) if seen else None
            except ValueError:
                self._newest_time = None

    @property
    def first_use(self) -> bool:
        """Whether keys are learned from the servers themselves (no key of any kind was given)."""
        return not self._pinned and not self._vendors

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

    @property
    def newest_server_time(self) -> datetime | None:
        """The latest signed server time (an authorization's issuedAt) this device has seen."""
        return self._newest_time

    async def handshake(self, *, client_uuid: str, product: str, deployment_type: str,
                        now: datetime | None = None, use_cache: bool = True, **fields: Any) -> Authorization:
        """An authorization for the request: the cached one until its refreshBy, else the servers' answer;
        when no server answers, a cached one still valid. A device clock behind the newest server time it
        has seen (by more than clock_tolerance) ignores the cache. A borrow (`borrow_days`) is always asked
        of the servers; a wait for a seat (`wait_seconds=S`) may take the timeout plus S."""
        password = fields.pop("session_password", None)
        if self.fingerprint is not None and "device_fingerprint" not in fields:
            fields["device_fingerprint"] = self.fingerprint
        request = {"clientUuid": client_uuid, "product": product, "deploymentType": deployment_type,
                   **{_camel(k): v for k, v in fields.items() if v is not None}}
        body = {**request, **({"sessionPassword": password} if password is not None else {})}
        now = now or datetime.now(UTC)
        asked = {k: v for k, v in request.items() if k not in HOW_TO_ASK}
        cache_file = self._cache_file(asked)
        clock_behind = self._newest_time is not None and now < self._newest_time - self.clock_tolerance
        # A borrow changes what the server holds: a cached answer, borrowed or not, is no grant of it.
        use_cache = use_cache and "borrowDays" not in request
        timeout = self._timeout(request)
        cached = None
        if use_cache and cache_file is not None and not clock_behind:
            cached = self._read_cached(cache_file, asked, password, now)
            if cached is not None and now < cached.refresh_by:
                self._latest[(cached.fields["handshakeCode"], client_uuid)] = cached
                return cached
        errors: list[str] = []
        refused_signature: BadSignature | None = None
        for url in self.failover.order():
            try:
                auth = await self._handshake_at(url, body, request, now, timeout)
            except LicenseRefused as refused:
                if refused.code in NEXT_SERVER:
                    self.failover.failed(url)
                    errors.append(f"{url}: {refused.code}: {refused.message}")
                    continue
                self.failover.answered(url)
                if cache_file is not None:  # the server decided afresh: the old authorization is over
                    cache_file.unlink(missing_ok=True)
                raise
            except BadSignature as e:  # try the others; if none answers trustworthily, say why this one failed
                self.failover.failed(url)
                refused_signature = refused_signature or e
                errors.append(f"{url}: {e}")
                continue
            except (aiohttp.ClientError, TimeoutError, OSError, ServerUnavailable) as e:
                self.failover.failed(url)
                errors.append(f"{url}: {_reason(e, timeout.total)}")
                continue
            self.failover.answered(url)
            self._accept(auth, asked, password, cache_file)
            self._latest[(auth.fields["handshakeCode"], client_uuid)] = auth
            return auth
        if refused_signature is not None:
            raise refused_signature
        if cached is not None:  # offline: the cached authorization still holds until it expires
            self._latest[(cached.fields["handshakeCode"], client_uuid)] = cached
            return cached
        if clock_behind:
            errors.append(f"the cache is not used: this device's clock ({now.isoformat()}) is behind the newest server "
                          f"time it has seen ({self._newest_time.isoformat() if self._newest_time else ''})")
        raise ServerUnavailable("; ".join(errors))

    def _timeout(self, request: dict[str, Any]) -> aiohttp.ClientTimeout:
        """The timeout of a handshake: the session's, plus the seconds it waits for a seat. The server holds a
        waiting request open that long; giving up earlier would take it out of the queue (a disconnect) and
        mark a server failed that was only waiting."""
        timeout = self.session.timeout
        wait = request.get("waitSeconds")
        if isinstance(wait, int | float) and wait > 0 and timeout.total is not None:
            return aiohttp.ClientTimeout(total=timeout.total + wait)
        return timeout

    async def _handshake_at(self, url: str, body: dict[str, Any], request: dict[str, Any],
                            now: datetime, timeout: aiohttp.ClientTimeout) -> Authorization:
        async with self.session.post(f"{url}/api/v1/handshake", json=body, timeout=timeout) as resp:
            data = await resp.read()
            if resp.status == 200:
                return await self._verified(url, data, request, now)
            if resp.status >= 500 and resp.status != 503:
                raise ServerUnavailable(f"HTTP {resp.status}")
            error = _error(data)
            if resp.status == 503 and error.get("code") not in NEXT_SERVER:
                raise ServerUnavailable(f"HTTP 503: {error.get('message')}")
            raise LicenseRefused.from_error(error, resp.status)

    async def _verified(self, url: str, data: bytes, request: dict[str, Any], now: datetime) -> Authorization:
        envelope = trust.decode_answer(data)
        learned = dict(self._learned.get(url, {}))
        if self.first_use and envelope.key_id not in learned:
            if learned:
                raise UntrustedKey(f"server {url} signed with key {envelope.key_id}, but it was first seen with key "
                                   f"{', '.join(learned)}: refused (remove the cache's keys.json to trust a new key)")
            learned[envelope.key_id] = await self._fetch_key(url, envelope.key_id)
        # The server is the authority on time: a fresh answer is judged at the later of the device's clock
        # and its own (signed) issue time; a device whose clock is far ahead still finds it expired.
        first_use = trust.keyring(learned, f"the key of {url}")
        verified = trust.verify_answer(envelope, request=request, now=max(now, _issued(envelope, now)),
                                       vendor_keys=self._vendors, pinned_keys=self._pinned,
                                       first_use_keys=first_use,
                                       server_uuids=self.server_uuids, tolerance=self.clock_tolerance)
        if verified.trust is Trust.FIRST_USE:
            self._learned[url] = learned
        return Authorization(verified.fields, verified.raw, verified.signature, verified.key_id, url,
                             verified.report_key, verified.trust, verified.binding)

    async def _fetch_key(self, url: str, key_id: str) -> str:
        async with self.session.get(f"{url}/api/v1/server") as resp:
            resp.raise_for_status()
            info = await resp.json()
        if info.get("keyId") != key_id:
            raise UntrustedKey(f"server {url} signs with key {info.get('keyId')}, the answer names {key_id}")
        return str(info["publicKey"])

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
        for url in self.failover.order():
            try:
                async with self.session.post(f"{url}/api/v1/usage", data=body, headers=headers) as resp:
                    data = await resp.read()
                    if resp.status >= 500:
                        self.failover.failed(url)
                        errors.append(f"{url}: HTTP {resp.status}")
                        continue
                    self.failover.answered(url)
                    if resp.status == 200:
                        return json.loads(data)
                    raise LicenseRefused.from_error(_error(data), resp.status)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                self.failover.failed(url)
                errors.append(f"{url}: {_reason(e, self.session.timeout.total)}")
        raise ServerUnavailable("; ".join(errors))

    # -- borrowing (offline checkout) ----------------------------------------

    async def borrow(self, *, client_uuid: str, product: str, deployment_type: str, days: int,
                     now: datetime | None = None, **fields: Any) -> Authorization:
        """Take the seat offline for `days` days (at most the item's, or the code's, borrowMaxDays).

        The server holds the seat until the authorization's `borrowed_until`; the cache keeps the
        authorization across restarts, filed under the same request without borrowing, so `handshake()`
        with the same fields answers from it while the device is offline. `return_borrowed()` gives it back.
        """
        return await self.handshake(client_uuid=client_uuid, product=product, deployment_type=deployment_type,
                                    now=now, borrow_days=days, **fields)

    def borrowed(self, now: datetime | None = None) -> list[Authorization]:
        """The borrows in the cache that still run (after a restart too): one per code, item and device, its
        newest authorization. An answer without `borrowedUntil` for the same seat ends the borrow."""
        now = now or datetime.now(UTC)
        return [auth for _, auth in self._cached(now)
                if auth.borrowed_until is not None and auth.borrowed_until > now]

    async def return_borrowed(self, authorization: Authorization) -> dict[str, Any]:
        """Give a borrowed seat back before `borrowed_until` (POST /api/v1/handshake/return) and drop it from the
        cache. The return is signed with the report key of the newest authorization this client got for the code
        and device, the only one the server takes, even when `authorization` is an older one; a repeat is harmless."""
        holder = (authorization.fields["handshakeCode"], authorization.fields["clientUuid"])
        latest = self._latest.get(holder)
        signer = latest if latest is not None and latest.issued_at > authorization.issued_at else authorization
        body = json.dumps({"clientUuid": holder[1], "handshakeCode": holder[0]}, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json",
                   MAC_HEADER: report_mac(base64.b64decode(signer.report_key), body)}
        errors = []
        servers = [signer.server, *(u for u in self.servers if u != signer.server)]
        for url in servers:
            try:
                async with self.session.post(f"{url}/api/v1/handshake/return", data=body, headers=headers) as resp:
                    data = await resp.read()
                    if resp.status == 200:
                        self._forget(signer)
                        return json.loads(data)
                    if resp.status >= 500:
                        errors.append(f"{url}: HTTP {resp.status}")
                        continue
                    raise LicenseRefused.from_error(_error(data), resp.status)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                errors.append(f"{url}: {_reason(e, self.session.timeout.total)}")
        raise ServerUnavailable("; ".join(errors))

    def _forget(self, returned: Authorization) -> None:
        """The server ended the device's authorization for the code: drop it, and the cache's answers for its
        seat (the device handshakes online next time)."""
        self._latest.pop((returned.fields["handshakeCode"], returned.fields["clientUuid"]), None)
        self._drop_seat(_seat(returned))

    # -- the authorization cache --------------------------------------------

    def _cached(self, now: datetime | None = None) -> Iterator[tuple[Path, Authorization]]:
        """Every cached authorization that is still trustworthy at `now`, with its file."""
        for path in self._cache_files():
            auth = self._read_cached(path, now=now)
            if auth is not None:
                yield path, auth

    def _cache_files(self) -> list[Path]:
        return sorted(self.cache_dir.glob("auth-*.json")) if self.cache_dir is not None else []

    def _drop_seat(self, seat: tuple[str, str, str], keep: Path | None = None) -> None:
        """Delete the cache's answers for `seat` (but `keep`). A file's seat is read without verifying it: enough
        to drop it, never to trust it; so an answer costs no signature check per cached file."""
        for path in self._cache_files():
            if path != keep and _file_seat(self._load_json(path)) == seat:
                path.unlink(missing_ok=True)

    def _cache_file(self, request: dict[str, Any]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = json.dumps(request, sort_keys=True)
        return self.cache_dir / f"auth-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def _password_mac(self, password: str | None, create: bool) -> str | None:
        """A keyed hash of the session password (never the password): the key is a random secret of this
        cache, so a copied cache file alone does not let anyone test guesses."""
        assert self.cache_dir is not None
        path = self.cache_dir / "cache-key"
        try:
            secret = path.read_bytes()
        except OSError:
            if not create:
                return None
            secret = secrets.token_bytes(32)
            self._write_bytes(path, secret)
        marker = b"\x01" + password.encode() if password is not None else b"\x00"
        return hmac.new(secret, b"lts-session-password\x00" + marker, hashlib.sha256).hexdigest()

    def _read_cached(self, path: Path, request: dict[str, Any] | None = None, password: str | None = None,
                     now: datetime | None = None) -> Authorization | None:
        """The cached authorization if it is still trustworthy for exactly this request and password, else None.
        It is checked as a fresh answer is (keys, signature, binding, fields, validity): an edited or copied
        cache file is worthless."""
        data = self._load_json(path)
        if not data:
            return None
        try:
            stored_request = data["request"]
            if request is not None and stored_request != request:
                return None
            mac = self._password_mac(password, create=False)
            if request is not None and (mac is None or not hmac.compare_digest(str(data["passwordMac"]), mac)):
                return None
            server = str(data["server"])
            verified = trust.verify_answer(
                base64.b64decode(data["answer"]), request=stored_request, now=now or datetime.now(UTC),
                vendor_keys=self._vendors, pinned_keys=self._pinned,
                first_use_keys=trust.keyring(self._learned.get(server, {}), "a learned key"),
                server_uuids=self.server_uuids, tolerance=self.clock_tolerance)
        except (KeyError, TypeError, ValueError, BadSignature):
            return None
        return Authorization(verified.fields, verified.raw, verified.signature, verified.key_id, server,
                             verified.report_key, verified.trust, verified.binding)

    def _accept(self, auth: Authorization, request: dict[str, Any], password: str | None,
                cache_file: Path | None) -> None:
        """Keep a verified answer: the newest server time, the key learned, the cache entry. The entry replaces
        the cache's answers for the same seat under other request fields (another `version`, say): the server
        keeps one authorization per code and device, so an older copy holds a dead report key, and a borrow it
        shows may be over."""
        issued = auth.issued_at
        if self._newest_time is None or issued > self._newest_time:
            self._newest_time = issued
        if self.cache_dir is None or cache_file is None:
            return
        self._write_json(self.cache_dir / "clock.json", {"newestServerTime": self._newest_time.isoformat()})
        if auth.trust is Trust.FIRST_USE:
            self._write_json(self.cache_dir / "keys.json", {"firstUse": self._learned})
        answer = (b'{"authorization":' + auth.raw + b',"signature":' + json.dumps(auth.signature).encode()
                  + b',"keyId":' + json.dumps(auth.key_id).encode() + b',"reportKey":'
                  + json.dumps(auth.report_key).encode()
                  + (b',"binding":' + msgspec.json.encode(auth.binding) if auth.binding is not None else b"") + b"}")
        self._write_json(cache_file, {"request": request, "passwordMac": self._password_mac(password, create=True),
                                      "server": auth.server, "answer": base64.b64encode(answer).decode()})
        self._drop_seat(_seat(auth), keep=cache_file)

    @staticmethod
    def _load_json(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_json(self, path: Path, data: dict[str, Any]) -> None:
        self._write_bytes(path, json.dumps(data).encode())

    @staticmethod
    def _write_bytes(path: Path, data: bytes) -> None:
        # Owner-only, the folder too: a cached authorization holds the device's report key.
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(path.parent, 0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.replace(path)


def _fingerprint() -> str | None:
    try:
        return device_fingerprint()
    except OSError:
        return None


def _issued(envelope: trust.Envelope, default: datetime) -> datetime:
    try:
        value = msgspec.json.decode(bytes(envelope.authorization)).get("issuedAt")
        return _when(value).astimezone(UTC) if isinstance(value, str) else default
    except (msgspec.DecodeError, AttributeError, ValueError):
        return default


def _read_learned(data: dict[str, Any], servers: list[str]) -> dict[str, dict[str, str]]:
    """Keys learned on first use, per server. A cache of an older version pinned keys for every server."""
    if isinstance(data.get("firstUse"), dict):
        return {url: dict(keys) for url, keys in data["firstUse"].items() if isinstance(keys, dict)}
    flat = {k: v for k, v in data.items() if isinstance(v, str)}
    return {url: dict(flat) for url in servers} if flat else {}


def _seat(auth: Authorization) -> tuple[str, str, str]:
    """The seat an authorization is for: its code, item and device."""
    return auth.fields["handshakeCode"], auth.fields.get("itemId", ""), auth.fields["clientUuid"]


def _file_seat(data: dict[str, Any]) -> tuple[str, str, str] | None:
    """The seat of a cache file's answer, as it says (unverified), or None when it says none."""
    try:
        fields = json.loads(base64.b64decode(data["answer"]))["authorization"]
        return fields["handshakeCode"], fields.get("itemId", ""), fields["clientUuid"]
    except (KeyError, TypeError, ValueError):
        return None


def _reason(error: BaseException, seconds: float | None) -> str:
    """What went wrong with a request, never empty: aiohttp's timeout exceptions carry no message."""
    if isinstance(error, TimeoutError) and not str(error):
        return f"timed out after {seconds:g} s" if seconds is not None else "timed out"
    return str(error) or type(error).__name__


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _error(data: bytes) -> dict[str, Any]:
    try:
        return json.loads(data).get("error", {})
    except (ValueError, AttributeError):
        return {"message": data[:200].decode(errors="replace")}
