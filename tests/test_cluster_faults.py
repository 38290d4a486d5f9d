"""Faults of a PostgreSQL cluster without a cluster-wide lock (issue 24), through HTTP with real daemons.

A node killed with -9 while it holds leased seats, PostgreSQL restarted under load, the writers'
connections cut mid-batch: no acknowledged grant is lost, no seat is granted twice, the leased seats
are back on their items within cluster.lease_ms, and answers during the outage are 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from tests.conftest import Daemon, Vendor, item, license_spec, write_config

LEASE_MS = 2000
HOT = "216998-H"  # item h1: 100 seats, 110 with the grace
ROOMY = "216998-R"  # item r1: room for every device of the tests


def _config(folder: Path, vendor: Vendor, url: str) -> Path:
    return write_config(folder, vendor, storage={"state_dir": str(folder / "state"), "backend": "postgresql",
                                                 "url": url, "follow_ms": 50},
                        cluster={"lease_ms": LEASE_MS})


def _nodes(tmp_path: Path, vendor: Vendor, url: str, factory: Callable[..., Daemon], count: int) -> list[Daemon]:
    (tmp_path / "n0" / "import").mkdir(parents=True)
    (tmp_path / "n0" / "import" / "h.lic").write_bytes(vendor.issue(license_spec("H", items=[
        item("h1", quantity=100)])))
    (tmp_path / "n0" / "import" / "r.lic").write_bytes(vendor.issue(license_spec("R", items=[
        item("r1", quantity=1_000_000)])))
    return [factory(_config(tmp_path / f"n{k}", vendor, url)) for k in range(count)]


def _body(code: str, device: str) -> dict[str, str]:
    return {"handshakeCode": code, "clientUuid": device, "product": "barcode-reader", "deploymentType": "browser"}


@dataclass
class Answers:
    granted: list[str] = field(default_factory=list)  # devices answered 200
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    bad: list[str] = field(default_factory=list)  # answers other than 200, 503 + Retry-After, or 403/120


async def _ask(session: aiohttp.ClientSession, url: str, code: str, device: str, answers: Answers) -> int | None:
    try:
        async with session.post(f"{url}/api/v1/handshake", json=_body(code, device)) as r:
            payload = await r.json(content_type=None)
            error = payload.get("error", {}).get("code") if r.status != 200 else None
            answers.outcomes[f"{r.status}/{error}" if error is not None else str(r.status)] += 1
            if r.status == 200:
                answers.granted.append(device)
            elif not (r.status == 503 and r.headers.get("Retry-After")) and (r.status, error) != (403, 120):
                answers.bad.append(f"{r.status} {payload}")
            return r.status
    except (aiohttp.ClientError, asyncio.TimeoutError):  # a node killed mid-request: no answer, nothing promised
        answers.outcomes["no answer"] += 1
        return None


async def _load(session: aiohttp.ClientSession, urls: list[str], code: str, stop: asyncio.Event, answers: Answers,
                loops: int = 16, prefix: str = "d") -> None:
    async def loop(k: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await _ask(session, urls[k % len(urls)], code, f"{prefix}{k}-{n}", answers)
            await asyncio.sleep(0)

    await asyncio.gather(*(loop(k) for k in range(loops)))


async def _counts(conn: asyncpg.Connection) -> dict[str, tuple[int, int, int]]:
    """Per item: (items.seats_used, seats held, seats leased to nodes)."""
    rows = await conn.fetch(
        "SELECT i.item_id, i.seats_used, (SELECT COUNT(*) FROM seats s WHERE s.item_id = i.item_id),"
        " (SELECT COALESCE(SUM(seats), 0) FROM seat_leases l WHERE l.item_id = i.item_id) FROM items i")
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


async def _check_durable(conn: asyncpg.Connection, answers: Answers) -> None:
    """Every grant answered is in the database, once; no device holds two seats; the counters add up."""
    seats = collections.Counter(r[0] for r in await conn.fetch("SELECT client_uuid FROM seats"))
    assert not [d for d in answers.granted if seats[d] != 1], "an answered grant without its seat"
    assert not [d for d, n in seats.items() if n > 1], "a device seated twice"
    events = await conn.fetchval("SELECT COUNT(*) FROM events WHERE type = 'handshake' AND result = 0")
    assert events >= len(answers.granted)
    for item_id, (used, held, leased) in (await _counts(conn)).items():
        assert used == held + leased, (item_id, used, held, leased)


async def _leases_back(conn: asyncpg.Connection, within: float) -> float:
    """Seconds until no seat is leased any more and every counter equals the seats held."""
    started = time.monotonic()
    while True:
        counts = await _counts(conn)
        if all(used == held and leased == 0 for used, held, leased in counts.values()):
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"leases still out after {within} s: {counts}"
        await asyncio.sleep(0.05)


async def _ready(session: aiohttp.ClientSession, urls: list[str]) -> None:
    """Every node knows both codes (node 0 imported them; the others follow)."""
    deadline = time.monotonic() + 20
    for url in urls:
        for code in (HOT, ROOMY):
            while True:
                async with session.post(f"{url}/api/v1/handshake",
                                        json={**_body(code, "warm"), "product": "other"}) as r:
                    if (await r.json()).get("error", {}).get("code") == 106:
                        break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)


async def test_kill_9_of_a_node_holding_leases_loses_no_grant_and_its_seats_come_back(
        tmp_path: Path, vendor: Vendor, pg_url: str, daemon_factory: Callable[..., Daemon]) -> None:
    a, b = _nodes(tmp_path, vendor, pg_url, daemon_factory, 2)
    conn = await asyncpg.connect(pg_url)
    answers = Answers()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            await _ready(session, [a.url, b.url])
            # Node a alone grants on the hot item until it holds a lease of its seats.
            n = 0
            while True:
                await asyncio.gather(*(_ask(session, a.url, HOT, f"a-{n}-{k}", answers) for k in range(16)))
                n += 1
                leased = await conn.fetchval("SELECT COALESCE(SUM(seats), 0) FROM seat_leases WHERE item_id = 'h1'")
                if leased > 0:
                    break
                assert n < 6, f"no lease after {n} rounds of 16: {answers.outcomes}"
            dying = await conn.fetchval("SELECT node FROM seat_leases WHERE item_id = 'h1' AND seats > 0")
            # kill -9, with requests in flight.
            flight = [asyncio.ensure_future(_ask(session, a.url, HOT, f"cut-{k}", answers)) for k in range(8)]
            await asyncio.sleep(0.01)
            a.proc.kill()
            killed = time.monotonic()
            await asyncio.gather(*flight)
            # Its leased seats are back within cluster.lease_ms (the other node sweeps the dead one).
            while await conn.fetchval("SELECT COUNT(*) FROM seat_leases WHERE node = $1", dying):
                assert time.monotonic() - killed < LEASE_MS / 1000, "a dead node's leased seats did not come back"
                await asyncio.sleep(0.05)
            used, held, leased = (await _counts(conn))["h1"]
            assert used == held + leased
            # The survivor seats the rest of the item, and not one more: 110 seats in all, each granted once.
            k = 0
            while await _ask(session, b.url, HOT, f"b-{k}", answers) == 200 or answers.outcomes["403/120"] == 0:
                k += 1
                assert k < 200
    finally:
        await asyncio.sleep(0)  # the daemons are stopped by the fixture
    seats = await conn.fetchval("SELECT COUNT(*) FROM seats WHERE item_id = 'h1'")
    assert seats == 110 and len(set(answers.granted)) == len(answers.granted) <= 110
    assert answers.bad == [], answers.bad
    await _check_durable(conn, answers)
    await conn.close()


async def test_postgresql_restarted_under_load(tmp_path: Path, vendor: Vendor, pg_server: Any,
                                                daemon_factory: Callable[..., Daemon]) -> None:
    url = await pg_server.new_database()
    nodes = _nodes(tmp_path, vendor, url, daemon_factory, 2)
    urls = [n.url for n in nodes]
    before, during, after = Answers(), Answers(), Answers()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await _ready(session, urls)
        stop = asyncio.Event()
        load = asyncio.ensure_future(_load(session, urls, ROOMY, stop, before, prefix="before"))
        await asyncio.sleep(1.5)
        stop.set()
        await load
        await asyncio.to_thread(pg_server.halt)
        try:
            stop = asyncio.Event()
            load = asyncio.ensure_future(_load(session, urls, ROOMY, stop, during, loops=8, prefix="during"))
            await asyncio.sleep(2)
            stop.set()
            await load
        finally:
            await asyncio.to_thread(pg_server.launch)
        stop = asyncio.Event()
        load = asyncio.ensure_future(_load(session, urls, ROOMY, stop, after, prefix="after"))
        deadline = time.monotonic() + 20
        while len(after.granted) < 50:
            assert time.monotonic() < deadline, f"no grants after the restart: {after.outcomes}"
            await asyncio.sleep(0.1)
        stop.set()
        await load
    assert before.granted and before.bad == []
    # The database away: every answer is a 503 with Retry-After (no grant, no other error).
    assert during.outcomes and all(o.startswith("503") for o in during.outcomes), during.outcomes
    assert during.granted == [] and during.bad == []
    assert after.bad == []
    conn = await asyncpg.connect(url)
    try:
        everything = Answers(granted=before.granted + after.granted)
        await _check_durable(conn, everything)
        await _leases_back(conn, LEASE_MS / 1000 + 1.5)  # idle leases go back at the next renewal
    finally:
        await conn.close()


async def test_writer_connections_cut_mid_batch(tmp_path: Path, vendor: Vendor, pg_url: str,
                                                daemon_factory: Callable[..., Daemon]) -> None:
    nodes = _nodes(tmp_path, vendor, pg_url, daemon_factory, 2)
    urls = [n.url for n in nodes]
    answers = Answers()
    conn = await asyncpg.connect(pg_url)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await _ready(session, urls)
            stop = asyncio.Event()
            load = asyncio.gather(_load(session, urls, HOT, stop, answers, loops=8, prefix="h"),
                                  _load(session, urls, ROOMY, stop, answers, loops=8, prefix="r"))
            cut = 0
            for _ in range(20):  # the nodes' writer connections cut every 0.1 s, whatever they are sending
                await asyncio.sleep(0.1)
                cut += await conn.fetchval(
                    "SELECT COUNT(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name LIKE 'lts-server writer%' AND datname = current_database()")
            await asyncio.sleep(1)
            stop.set()
            await load
        assert cut >= 10
        assert sum(n for o, n in answers.outcomes.items() if o.startswith("503")) > 0  # the cuts were felt
        assert answers.bad == [], answers.bad
        granted_hot = [d for d in answers.granted if d.startswith("h")]
        assert len(granted_hot) <= 110 and answers.outcomes["200"] > 100
        await _check_durable(conn, answers)
        assert await conn.fetchval("SELECT COUNT(*) FROM seats WHERE item_id = 'h1'") <= 110
        await _leases_back(conn, LEASE_MS / 1000 + 1.5)
    finally:
        await conn.close()
