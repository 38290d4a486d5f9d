"""Shared fixtures: a vendor key, license files relative to now, configs and servers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lts_client import MAC_HEADER, report_mac
from lts_server import config as config_mod
from lts_server import licensefile
from lts_server.cli.vendor import payload_from_spec
from lts_server.server import Server
from lts_server.store import Store
from lts_server.store.postgres import PostgresStore, numbered
from lts_server.store.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime.now(UTC).replace(microsecond=0)
# items.seats_used counts the seats nodes of a cluster leased (store/sql_leases.py): the seats held are the rest.
HELD_SEATS = "seats_used - COALESCE((SELECT SUM(l.seats) FROM seat_leases l WHERE l.item_id = items.item_id), 0)"


@dataclass
class Vendor:
    key: Ed25519PrivateKey
    pub_path: Path
    key_path: Path

    def issue(self, spec: dict[str, Any]) -> bytes:
        """Sign a spec (snake_case, as lts-license takes it) into license file bytes."""
        payload = payload_from_spec(spec, NOW)
        if payload.server_key is not None:
            payload = licensefile.make_binding(payload, self.key)
        return licensefile.sign(licensefile.encode_payload(payload), self.key)


def make_vendor(folder: Path) -> Vendor:
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    key_path = folder / "vendor.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pub_path = folder / "vendor.pub"
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    return Vendor(key, pub_path, key_path)


@pytest.fixture
def vendor(tmp_path: Path) -> Vendor:
    return make_vendor(tmp_path / "vendor")


def item(item_id: str, license_type: str = "per-device", **kw: Any) -> dict[str, Any]:
    """An item spec valid from yesterday for a year, relative to now so fixtures never expire."""
    spec: dict[str, Any] = {
        "item_id": item_id,
        "product": "barcode-reader",
        "deployment_type": "browser",
        "license_type": license_type,
        "quantity": 10,
        "starts_at": NOW - timedelta(days=1),
        "expires_at": NOW + timedelta(days=365),
    }
    if license_type in ("per-device", "per-server"):
        spec["period"] = "yearly"
    if license_type in ("per-server", "per-concurrent-instance"):
        spec["deployment_type"] = "server"
    if license_type == "per-domain":
        spec["domain"] = "*.example.com"
    spec.update(kw)
    return spec


def license_spec(license_id: str = "L1", org: str = "216998", items: list[dict[str, Any]] | None = None,
                 **kw: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"license_id": license_id, "organization_id": org,
                            "items": items or [item(f"{license_id}-1")]}
    spec.update(kw)
    return spec


def write_config(folder: Path, trusted: Vendor | None, /, **sections: dict[str, Any]) -> Path:
    """A config for a server living in `folder`, trusting `trusted`'s key; sections override the defaults."""
    base: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout": 5.0},
        "storage": {"state_dir": str(folder / "state")},
        # settle_ms 0: a file the test just wrote is verified at once (tests/test_imports_lifecycle.py tests the wait).
        "import": {"directory": str(folder / "import"), "rescan_seconds": 3600, "watch": False, "settle_ms": 0},
        "vendor": {"public_keys": [str(trusted.pub_path)] if trusted else [], "allow_unbound": True},
        "log": {"level": "warning", "format": "json"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    (folder / "import").mkdir(parents=True, exist_ok=True)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


async def query(store: Store, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of a query on an open store's database, SQLite or PostgreSQL (`?` placeholders)."""
    if isinstance(store, PostgresStore):
        return [tuple(r) for r in await store.pool.fetch(numbered(statement), *args)]
    assert isinstance(store, SQLiteStore)
    return await query_database(store.path, statement, *args)


async def query_database(database: Path | str, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of a query on a SQLite file or a PostgreSQL URL (`?` placeholders), on a connection of its own."""
    if isinstance(database, str):
        conn = await asyncpg.connect(database)
        try:
            return [tuple(r) for r in await conn.fetch(numbered(statement), *args)]
        finally:
            await conn.close()
    con = sqlite3.connect(database)
    try:
        rows = con.execute(statement, args).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


@dataclass
class Running:
    server: Server
    url: str
    folder: Path
    vendor: Vendor
    session: aiohttp.ClientSession
    clock: Clock = field(default_factory=Clock)
    report_keys: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def ledger(self):  # noqa: ANN201
        assert self.server.services is not None
        return self.server.services.ledger

    @property
    def importer(self):  # noqa: ANN201
        assert self.server.services is not None
        return self.server.services.importer

    async def sql(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of a query on the server's database, whichever the backend (`?` placeholders)."""
        assert self.server.services is not None
        return await query(self.server.services.store, statement, *args)

    async def sql_value(self, statement: str, *args: Any) -> Any:
        """The first column of the first row of a query (see `sql`)."""
        return (await self.sql(statement, *args))[0][0]

    async def drop(self, name: str, data: bytes) -> Path:
        path = self.folder / "import" / name
        path.write_bytes(data)
        await self.importer.scan("test")
        return path

    async def handshake(self, **body: Any) -> tuple[int, dict[str, Any]]:
        """POST a handshake; a granted one's report key is kept for usage reports, as a device would."""
        body.setdefault("clientUuid", "device-1")
        body.setdefault("product", "barcode-reader")
        body.setdefault("deploymentType", "browser")
        async with self.session.post(f"{self.url}/api/v1/handshake", json=body) as resp:
            answer = await resp.json()
        if resp.status == 200:
            self.report_keys[(answer["authorization"]["handshakeCode"], body["clientUuid"])] = answer["reportKey"]
        return resp.status, answer

    async def report(self, body: dict[str, Any], mac: str | None = None) -> tuple[int, dict[str, Any]]:
        """POST a usage report, MACed with the device's report key unless `mac` is given."""
        data = json.dumps(body).encode()
        key = self.report_keys.get((body.get("handshakeCode"), body.get("clientUuid")))
        headers = {"Content-Type": "application/json"}
        if mac is not None:
            headers[MAC_HEADER] = mac
        elif key is not None:
            headers[MAC_HEADER] = report_mac(base64.b64decode(key), data)
        async with self.session.post(f"{self.url}/api/v1/usage", data=data, headers=headers) as resp:
            return resp.status, await resp.json()


BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test on `backend` (the `running` server's included) runs on both stores, unless marked sqlite_only."""
    if "backend" in metafunc.fixturenames:
        backends = ["sqlite"] if metafunc.definition.get_closest_marker("sqlite_only") else list(BACKENDS)
        metafunc.parametrize("backend", backends)


async def storage_section(request: pytest.FixtureRequest, backend: str, folder: Path) -> dict[str, Any]:
    """The [storage] settings of a test server on `backend`: PostgreSQL gets a fresh database."""
    storage: dict[str, Any] = {"state_dir": str(folder / "state")}
    if backend == "postgresql":
        pg_server = request.getfixturevalue("pg_server")
        storage.update(backend="postgresql", url=await pg_server.new_database(), follow_ms=50)
    return storage


@pytest.fixture
def new_store(request: pytest.FixtureRequest, backend: str,
              tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Awaitable[Store]]:
    """Makes an unopened store on `backend` over a new empty database, as often as a test asks."""
    pg_server = request.getfixturevalue("pg_server") if backend == "postgresql" else None

    async def make() -> Store:
        if pg_server is not None:
            return PostgresStore(await pg_server.new_database())
        return SQLiteStore(tmp_path_factory.mktemp("store") / "db.sqlite3")

    return make


@pytest.fixture
async def running(request: pytest.FixtureRequest, backend: str, tmp_path: Path,
                  vendor: Vendor) -> AsyncIterator[Running]:
    """An in-process server on a free port, with a clock the test controls, on each backend."""
    clock = Clock()
    storage = await storage_section(request, backend, tmp_path)
    cfg = config_mod.load(write_config(tmp_path, vendor, storage=storage), environ={})
    server = Server(cfg, clock=clock)
    await server.start()
    url = server.urls[0]
    token = await admin_login(url)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        yield Running(server, url, tmp_path, vendor, session, clock)
    await server.stop()


ADMIN_PASSWORD = "correct horse battery staple"


async def admin_login(url: str, password: str = ADMIN_PASSWORD) -> str:
    """Set the admin password (first run) and log in; returns a bearer token."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/api/v1/admin/setup", json={"password": password}) as resp:
            assert resp.status in (201, 409), await resp.text()
        async with session.post(f"{url}/api/v1/admin/login", json={"password": password}) as resp:
            assert resp.status == 200, await resp.text()
            return (await resp.json())["token"]


UNDER_CI = os.environ.get("CI") == "true"


def unavailable(message: str) -> None:
    """What a test needs is missing: a skip on a developer's machine, a failure under CI (CI=true), where
    every service and tool the suite uses must be there."""
    if UNDER_CI:
        pytest.fail(message + ": required under CI (CI=true)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    folder: Path
    log_path: Path
    # The SQLite file or the PostgreSQL URL it serves from (set by fixtures that know it).
    database: Path | str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_daemon(config_path: Path, folder: Path, env: dict[str, str] | None = None,
                 wait: bool = True, port: int | None = None, open_files: int | None = None) -> Daemon:
    """Start `python -m lts_server` as a real process and wait until it listens.

    open_files: the daemon's limit on open files (soft and hard), to test behaviour at the limit."""
    port = port or free_port()
    full_env = {**os.environ, "LTS_SERVER__PORT": str(port), **(env or {})}
    log_path = folder / f"daemon-{port}.log"

    def limit_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    proc = subprocess.Popen([sys.executable, "-m", "lts_server", "--config", str(config_path)],
                            stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=full_env,
                            preexec_fn=limit_files)
    daemon = Daemon(proc, f"http://127.0.0.1:{port}", folder, log_path)
    if wait:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode}:\n{daemon.log()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            proc.kill()
            raise AssertionError(f"daemon did not listen:\n{daemon.log()}")
    return daemon


def stop_daemon(daemon: Daemon, timeout: float = 15) -> int:
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
    try:
        return daemon.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        daemon.proc.kill()
        raise


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def factory(config_path: Path, **kw: Any) -> Daemon:
        d = start_daemon(config_path, tmp_path, **kw)
        started.append(d)
        return d

    yield factory
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One PostgreSQL server for the whole run (see tests/pg.py); each test takes a new database."""
    from tests import pg

    server = pg.start()
    yield server
    server.stop()


@pytest.fixture
async def pg_url(pg_server: Any) -> str:
    return await pg_server.new_database()
