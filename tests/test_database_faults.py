"""Database faults under load: PostgreSQL killed with kill -9 while a node serves, then SIGTERM after it.

Each test starts a PostgreSQL server of its own (tests/pg.py): killing the shared one would fail the
tests around it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import pg
from tests.conftest import Daemon, Vendor, admin_login, item, license_spec, start_daemon, stop_daemon
from tests.test_postgres import pg_config


@pytest.fixture
def own_pg() -> Iterator[pg.PgServer]:
    server = pg.start()
    yield server
    server.stop()


def _postgres_pids(server: pg.PgServer) -> list[int]:
    """The postmaster and every process it started."""
    postmaster = int((server.folder / "data" / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(entry))
    return [postmaster, *children]


def kill_9(server: pg.PgServer) -> None:
    """kill -9 the postmaster and every backend it started: the database is gone mid-statement."""
    pids = _postgres_pids(server)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in pids):
        assert time.monotonic() < deadline, "PostgreSQL did not die"
        time.sleep(0.05)
    # A dead postmaster left as a zombie (nothing reaps it in a container) still has a live PID: its lock
    # files would keep the next one from starting, as they would not on a host whose init reaps it.
    (server.folder / "data" / "postmaster.pid").unlink()
    (server.folder / f".s.PGSQL.{server.port}.lock").unlink(missing_ok=True)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except OSError:
        return "zombie"


class Load:
    """Devices asking without pause, new ones and returning ones; every answer's status is counted."""

    def __init__(self, url: str, code: str, devices: int = 16, token: str | None = None,
                 license_file: bytes = b"") -> None:
        self.url = url
        self.code = code
        self.devices = devices
        # With an admin token, one more client uploads the license again and reads the admin API meanwhile.
        self.token = token
        self.license_file = license_file
        self.statuses: Counter[int] = Counter()
        self.bad: list[tuple[int, str, dict[str, str]]] = []  # a 5xx other than 503 + Retry-After
        self.refusals: set[str] = set()  # the messages of the 503s
        self.stop = asyncio.Event()
        self._names = count()

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            admin = [self._admin(session)] if self.token else []
            await asyncio.gather(*(self._device(session, k) for k in range(self.devices)), *admin)

    async def _admin(self, session: aiohttp.ClientSession) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        requests = [("POST", "/api/v1/admin/licenses?name=k.lic", self.license_file),
                    ("GET", f"/api/v1/admin/stats/codes/{self.code}", None), ("GET", "/api/v1/admin/status", None),
                    ("GET", "/api/v1/admin/items/k1/devices", None), ("GET", "/portal/", None)]
        n = 0
        while not self.stop.is_set():
            method, path, data = requests[n % len(requests)]
            n += 1
            try:
                async with session.request(method, f"{self.url}{path}", data=data, headers=headers,
                                           allow_redirects=False) as resp:
                    text = await resp.text()
                    self.statuses[resp.status] += 1
                    if resp.status >= 500 and (resp.status != 503 or not resp.headers.get("Retry-After")):
                        self.bad.append((resp.status, f"{method} {path}: {text[:300]}", dict(resp.headers)))
            except (aiohttp.ClientError, TimeoutError) as e:
                self.bad.append((0, f"{method} {path}: {e!r}", {}))
            await asyncio.sleep(0.02)

    async def _device(self, session: aiohttp.ClientSession, k: int) -> None:
        while not self.stop.is_set():
            n = next(self._names)
            client = f"d{k}-{n}" if n % 3 else f"d{k}"  # two in three new devices: the device-loading path
            body = {"handshakeCode": self.code, "clientUuid": client, "product": "barcode-reader",
                    "deploymentType": "browser"}
            try:
                async with session.post(f"{self.url}/api/v1/handshake", json=body) as resp:
                    text = await resp.text()
                    self.statuses[resp.status] += 1
                    if resp.status >= 500 and (resp.status != 503 or not resp.headers.get("Retry-After")):
                        self.bad.append((resp.status, text, dict(resp.headers)))
                    elif resp.status == 503:
                        self.refusals.add(json.loads(text)["error"]["message"])
                    elif resp.status not in (200, 403):
                        self.bad.append((resp.status, text, dict(resp.headers)))
            except (aiohttp.ClientError, TimeoutError) as e:  # the node itself must not drop requests
                self.bad.append((0, repr(e), {}))
                await asyncio.sleep(0.05)

    async def until_served(self, timeout: float = 30) -> float:
        """Seconds until a 200 is counted again."""
        started = time.monotonic()
        before = self.statuses[200]
        while self.statuses[200] == before:
            assert time.monotonic() - started < timeout, f"not served again within {timeout} s: {self.statuses}"
            await asyncio.sleep(0.02)
        return time.monotonic() - started


async def _node(tmp_path: Path, vendor: Vendor, database: pg.PgServer, **sections: Any) -> Daemon:
    (tmp_path / "import").mkdir(parents=True, exist_ok=True)
    (tmp_path / "import" / "k.lic").write_bytes(vendor.issue(license_spec("K", items=[
        item("k1", license_type="per-device", quantity=1_000_000)])))
    config = pg_config(tmp_path, vendor, await database.new_database(), **sections)
    return await asyncio.to_thread(start_daemon, config, tmp_path)


SHUTDOWN_TIMEOUT = 3.0
# What a stop may take beyond shutdown_timeout: server.STOP_GRACE, and the process's own exit.
STOP_SLACK = 2.5


def _sigterm(daemon: Daemon) -> tuple[int, float]:
    """SIGTERM the node; its exit code and the seconds it took."""
    started = time.monotonic()
    code = stop_daemon(daemon, 60)
    return code, time.monotonic() - started


@pytest.mark.slow
async def test_postgresql_killed_under_load_five_times_answers_503_never_500(
        tmp_path: Path, vendor: Vendor, own_pg: pg.PgServer) -> None:
    daemon = await _node(tmp_path, vendor, own_pg, server={"shutdown_timeout": SHUTDOWN_TIMEOUT})
    load = Load(daemon.url, "216998-K", token=await admin_login(daemon.url),
                license_file=(tmp_path / "import" / "k.lic").read_bytes())
    running = asyncio.ensure_future(load.run())
    try:
        await load.until_served()
        for _ in range(5):
            await asyncio.sleep(0.7)
            await asyncio.to_thread(kill_9, own_pg)
            await asyncio.sleep(1.0)  # requests meet the dead database
            await asyncio.to_thread(own_pg.launch)
            await load.until_served()
        await asyncio.sleep(0.5)
    finally:
        load.stop.set()
        await running
        code, took = await asyncio.to_thread(_sigterm, daemon)
    assert not load.bad, (load.bad[:5], load.statuses)
    assert load.statuses[503] > 0 and load.statuses[200] > 0, load.statuses  # the outages were met, and served
    assert set(load.statuses) <= {200, 303, 503}, load.statuses  # 303: the portal's redirect to its login
    # Said as it is: the database cannot be reached (not "locked or busy"), or the node is stopping.
    assert "storage unavailable (the database cannot be reached), nothing was recorded; retry later" in load.refusals
    assert not [m for m in load.refusals if "locked" in m], load.refusals
    # After the outages the node still stops on time (it used to wait for ever on a pool connection
    # that asyncpg never gave back).
    assert code == 0 and took < SHUTDOWN_TIMEOUT + STOP_SLACK, (code, took, daemon.log()[-3000:])
    log = daemon.log()
    assert '"event": "http.internal_error"' not in log and '"exception"' not in log, log[-5000:]


@pytest.mark.slow
async def test_sigterm_while_the_database_hangs_stops_within_shutdown_timeout(
        tmp_path: Path, vendor: Vendor, own_pg: pg.PgServer) -> None:
    """PostgreSQL frozen (SIGSTOP: connections open, nothing answered) with requests and commits waiting on
    it: SIGTERM still stops the node within shutdown_timeout, cutting the connections it holds."""
    daemon = await _node(tmp_path, vendor, own_pg, server={"shutdown_timeout": SHUTDOWN_TIMEOUT})
    load = Load(daemon.url, "216998-K", devices=8)
    running = asyncio.ensure_future(load.run())
    pids = _postgres_pids(own_pg)
    try:
        await load.until_served()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(1.0)  # requests, commits and the pool's connections now wait on it
        code, took = await asyncio.to_thread(_sigterm, daemon)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        load.stop.set()
        await running
    assert code == 0 and took < SHUTDOWN_TIMEOUT + STOP_SLACK, (code, took, daemon.log()[-3000:])
    assert "store.close_terminated" in daemon.log() or "ledger.stop_cut" in daemon.log(), daemon.log()[-3000:]
