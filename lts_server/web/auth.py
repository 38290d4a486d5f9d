"""Admin authentication: first-run setup, argon2id password, bearer tokens, login throttling."""

from __future__ import annotations

import asyncio
import hashlib
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
from lts_server.web.schemas import LoginBody, PasswordChangeBody, SetupBody
from lts_server.web.services import SERVICES, Services

ADMIN_PREFIX = "/api/v1/admin/"
OPEN_PATHS = {"/api/v1/admin/setup", "/api/v1/admin/login"}
MIN_PASSWORD = 12
# Failed logins per address within the window: slowed after SLOW_AFTER, refused after LOCK_AFTER.
WINDOW_SECONDS = 15 * 60
SLOW_AFTER = 3
LOCK_AFTER = 10

_hasher = PasswordHasher()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Throttle:
    """Counts failed logins per client address."""

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
        self._failures[address] = recent
        return len(recent)

    def fail(self, address: str) -> None:
        self._failures.setdefault(address, []).append(time.monotonic())

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


async def log_in(app: web.Application, address: str, password: str) -> dict[str, str]:
    """Check the password (throttled per address) and issue a token."""
    services, throttle = app[SERVICES], app[THROTTLE]
    failures = throttle.failures(address)
    if failures >= LOCK_AFTER:
        raise ApiError(429, f"too many failed logins from {address}; try again in {WINDOW_SECONDS // 60} minutes")
    stored = await services.store.admin_password_hash()
    if stored is None:
        raise ApiError(403, SETUP_REQUIRED)
    await asyncio.sleep(throttle.delay(failures))
    if not await verify_password(stored, password):
        throttle.fail(address)
        logs.event("admin.login_failed", logs.logging.WARNING, remote=address, failures=failures + 1)
        raise ApiError(401, "wrong password")
    throttle.clear(address)
    logs.event("admin.login", remote=address)
    return await issue_token(services)


async def change(services: Services, current: str, new: str) -> dict[str, str]:
    """Change the password, which ends every session; returns a token for the caller."""
    stored = await services.store.admin_password_hash()
    if stored is None or not await verify_password(stored, current):
        raise ApiError(400, "currentPassword: wrong password", "currentPassword")
    _check_new(new, "newPassword")
    await services.store.set_admin_password(await hash_password(new), to_ms(services.ledger.clock()))
    logs.event("admin.password_changed")
    return await issue_token(services)


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
    logs.event("admin.setup", remote=request.remote)
    return web.json_response({"user": "admin", "setup": True}, status=201)


async def login(request: web.Request) -> web.Response:
    body = decode_json(await read_json_body(request), LoginBody)
    return web.json_response(await log_in(request.app, request.remote or "?", body.password))


async def logout(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    await services.store.delete_admin_token(request[TOKEN_HASH])
    return web.json_response({"loggedOut": True})


async def change_password(request: web.Request) -> web.Response:
    body = decode_json(await read_json_body(request), PasswordChangeBody)
    token = await change(request.app[SERVICES], body.current_password, body.new_password)
    return web.json_response({"changed": True, **token})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if not path.startswith(ADMIN_PREFIX) or path in OPEN_PATHS:
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
