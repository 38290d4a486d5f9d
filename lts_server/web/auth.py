"""Admin authentication: first-run setup, argon2id password, bearer tokens, login throttling."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from lts_server import logs
from lts_server.core.times import from_ms, iso, to_ms
from lts_server.web.device import read_json_body
from lts_server.web.errors import ApiError, decode_json
from lts_server.web.schemas import MIN_PASSWORD, LoginBody, PasswordChangeBody, SetupBody
from lts_server.web.services import SERVICES, Services

ADMIN_PREFIX = "/api/v1/admin/"
OPEN_PATHS = {"/api/v1/admin/setup", "/api/v1/admin/login"}
# Admin endpoints outside ADMIN_PREFIX.
ADMIN_PATHS = {"/api/v1/usage/export"}
# Failed logins per address within the window: slowed after SLOW_AFTER, refused after LOCK_AFTER.
WINDOW_SECONDS = 15 * 60
SLOW_AFTER = 3
LOCK_AFTER = 10

_hasher = PasswordHasher()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Locked(Exception):
    """Too many failed password checks from one client address within the window."""


class Throttle:
    """Counts password attempts per client address.

    An attempt counts as a failure from the moment it starts and is only forgiven when the
    password was right: so a thousand concurrent guesses cannot all be checked before the
    first of them is counted.
    """

    def __init__(self, base_delay: float = 1.0) -> None:
        self._failures: dict[str, list[float]] = {}
        self.base_delay = base_delay

    def delay(self, failures: int) -> float:
        """Seconds to wait before checking a password: doubling past SLOW_AFTER, at most 8 s."""
        if failures < SLOW_AFTER:
            return 0.0
        return min(self.base_delay * 2.0 ** (failures - SLOW_AFTER), 8.0)

    def failures(self, address: str) -> int:
        now = time.monotonic()
        recent = [t for t in self._failures.get(address, []) if now - t < WINDOW_SECONDS]
        if recent:
            self._failures[address] = recent
        else:
            self._failures.pop(address, None)
        return len(recent)

    def begin(self, address: str) -> int:
        """Count one attempt (as a failure until proven right); returns the failures before it.

        Raises Locked when the address has used up its attempts."""
        failures = self.failures(address)
        if failures >= LOCK_AFTER:
            raise Locked(address)
        self._failures.setdefault(address, []).append(time.monotonic())
        return failures

    def clear(self, address: str) -> None:
        self._failures.pop(address, None)


THROTTLE = web.AppKey("throttle", Throttle)
TOKEN_HASH = web.RequestKey("token_hash", str)


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(stored: str, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)


SETUP_REQUIRED = "setup required: set the admin password with POST /api/v1/admin/setup"


def _check_new(password: str, field: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise ApiError(400, f"{field}: at least {MIN_PASSWORD} characters", field)


async def set_up(services: Services, password: str) -> None:
    """Set the first admin password."""
    _check_new(password, "password")
    done = await services.store.set_admin_password(await hash_password(password), to_ms(services.ledger.clock()),
                                                   only_if_unset=True)
    if not done:
        raise ApiError(409, "the admin password is already set; log in, or change it with the current one")


async def issue_token(services: Services) -> dict[str, str]:
    token = secrets.token_urlsafe(32)
    now = services.ledger.clock()
    expires = now + timedelta(hours=services.config.admin.token_ttl_hours)
    await services.store.add_admin_token(token_hash(token), to_ms(now), to_ms(expires))
    return {"token": token, "expiresAt": iso(expires)}


def _locked(address: str) -> ApiError:
    return ApiError(429, f"too many failed password attempts from {address}; try again in "
                         f"{WINDOW_SECONDS // 60} minutes")


async def _check_throttled(app: web.Application, address: str, stored: str, password: str) -> bool:
    """Check a password, counted and slowed per client address; True when it is right."""
    throttle = app[THROTTLE]
    try:
        failures = throttle.begin(address)
    except Locked:
        raise _locked(address) from None
    await asyncio.sleep(throttle.delay(failures))
    if not await verify_password(stored, password):
        logs.event("admin.login_failed", logs.logging.WARNING, remote=address, failures=failures + 1)
        return False
    throttle.clear(address)
    return True


async def log_in(app: web.Application, address: str, password: str) -> dict[str, str]:
    """Check the password (throttled per address) and issue a token."""
    services = app[SERVICES]
    if app[THROTTLE].failures(address) >= LOCK_AFTER:
        raise _locked(address)
    stored = await services.store.admin_password_hash()
    if stored is None:
        raise ApiError(403, SETUP_REQUIRED)
    if not await _check_throttled(app, address, stored, password):
        raise ApiError(401, "wrong password")
    logs.event("admin.login", remote=address)
    return await issue_token(services)


async def change(app: web.Application, address: str, current: str, new: str) -> dict[str, str]:
    """Change the password, which ends every session; returns a token for the caller.

    A wrong current password counts against the address like a failed login."""
    services = app[SERVICES]
    _check_new(new, "newPassword")
    stored = await services.store.admin_password_hash()
    if stored is None or not await _check_throttled(app, address, stored, current):
        raise ApiError(400, "currentPassword: wrong password", "currentPassword")
    await services.store.set_admin_password(await hash_password(new), to_ms(services.ledger.clock()))
    logs.event("admin.password_changed", remote=address)
    return await issue_token(services)


@functools.cache
def _networks(trusted: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t, strict=False) for t in trusted)


# The peer's address of a request a front process passed to the writer (lts_server/front.py).
FRONT_PEER = "X-Lts-Front-Peer"


def _is_trusted(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(request: web.Request) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy ([server] trusted_proxies),
    the last address in X-Forwarded-For that is not itself a trusted proxy. A request a front process passed
    on (server.workers > 1 on SQLite) came over the writer's owner-only Unix socket: its peer is in FRONT_PEER."""
    transport = request.transport
    if transport is not None and isinstance(transport.get_extra_info("sockname"), str):
        remote = request.headers.get(FRONT_PEER) or "?"
    else:
        remote = request.remote or "?"
    networks = _networks(tuple(request.app[SERVICES].config.server.trusted_proxies))
    if not networks or not _is_trusted(remote, networks):
        return remote  # anyone can write the header: believe it only from a proxy the config names
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, networks):
            return hop
    return hops[0] if hops else remote


async def live_token(services: Services, token: str) -> str | None:
    """The token's hash when it is known and not expired."""
    hashed = token_hash(token)
    expires = await services.store.admin_token_expiry(hashed)
    if expires is None or from_ms(expires) <= services.ledger.clock():
        return None
    return hashed


async def setup(request: web.Request) -> web.Response:
    body = decode_json(await read_json_body(request), SetupBody)
    await set_up(request.app[SERVICES], body.password)
    logs.event("admin.setup", remote=client_address(request))
    return web.json_response({"user": "admin", "setup": True}, status=201)


async def login(request: web.Request) -> web.Response:
    body = decode_json(await read_json_body(request), LoginBody)
    return web.json_response(await log_in(request.app, client_address(request), body.password))


async def logout(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    await services.store.delete_admin_token(request[TOKEN_HASH])
    return web.json_response({"loggedOut": True})


async def change_password(request: web.Request) -> web.Response:
    body = decode_json(await read_json_body(request), PasswordChangeBody)
    token = await change(request.app, client_address(request), body.current_password, body.new_password)
    return web.json_response({"changed": True, **token})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if not (path.startswith(ADMIN_PREFIX) or path in ADMIN_PATHS) or path in OPEN_PATHS:
        return await handler(request)
    services = request.app[SERVICES]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else ""
    hashed = await live_token(services, bearer) if bearer else None
    if hashed is not None:  # a live token implies setup is done: one lookup, not two
        request[TOKEN_HASH] = hashed
        return await handler(request)
    if await services.store.admin_password_hash() is None:
        raise ApiError(403, SETUP_REQUIRED)
    if not bearer:
        raise ApiError(401, "missing bearer token: log in with POST /api/v1/admin/login")
    raise ApiError(401, "the token is unknown or expired: log in again")
