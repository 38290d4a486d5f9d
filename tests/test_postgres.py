"""PostgreSQL: one cluster of nodes on one database, against a real server the tests start (tests/pg.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from lts_client import MAC_HEADER, LtsClient, report_mac
from lts_server import config as config_mod
from lts_server.server import Server
from lts_server.store import sql
from lts_server.store.postgres import DEVICE_ROWS, ROLLUP_LOCK, PostgresStore, drive
from lts_server.store.sqlite import migrations
from tests.conftest import (
    ADMIN_PASSWORD,
    HELD_SEATS,
    NOW,
    Clock,
    Daemon,
    Vendor,
    admin_login,
    free_port,
    item,
    license_spec,
    start_daemon,
    stop_daemon,
    wait_for,
    write_config,
)


def pg_config(folder: Path, vendor: Vendor, url: str, **sections: dict[str, Any]) -> Path:
    storage = {"state_dir": str(folder / "state"), "backend": "postgresql", "url": url, "follow_ms": 50}
    storage.update(sections.pop("storage", {}))
    return write_config(folder, vendor, storage=storage, **sections)


class Node:
    def __init__(self, server: Server, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.url = server.urls[0]

    @property
    def ledger(self):  # noqa: ANN201
        return self.server.services.ledger

    async def handshake(self, client: str, code: str = "216998-P") -> tuple[int, dict]:
        body = {"handshakeCode": code, "clientUuid": client, "product": "barcode-reader", "deploymentType": "browser"}
        async with self.session.post(f"{self.url}/api/v1/handshake", json=body) as resp:
            return resp.status, await resp.json()


async def start_node(folder: Path, vendor: Vendor, url: str, clock: Clock | None = None,
                     follow_ms: int = 50) -> Node:
    cfg = pg_config(folder, vendor, url, storage={"follow_ms": follow_ms})
    server = Server(config_mod.load(cfg, environ={}), clock=clock or Clock())
    await server.start()
    return Node(server, aiohttp.ClientSession())


async def stop_node(node: Node) -> None:
    await node.session.close()
    await node.server.stop()


@pytest.fixture
async def cluster(tmp_path: Path, vendor: Vendor, pg_url: str) -> AsyncIterator[tuple[Node, Node]]:
    """Two nodes on one database; node a imported license P (item p1: 50 seats, 55 with the grace)."""
    (tmp_path / "a" / "import").mkdir(parents=True)
    (tmp_path / "a" / "import" / "p.lic").write_bytes(vendor.issue(license_spec("P", items=[item("p1", quantity=50)])))
    a = await start_node(tmp_path / "a", vendor, pg_url)
    b = await start_node(tmp_path / "b", vendor, pg_url)
    try:
        yield a, b
    finally:
        for node in (a, b):
            await stop_node(node)


async def test_two_stores_opening_an_empty_database_together_migrate_it_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        conn = await asyncpg.connect(pg_url)
        versions = [r[0] for r in await conn.fetch("SELECT version FROM schema_version ORDER BY version")]
        await conn.close()
        assert versions == list(range(1, len(migrations()) + 1))
        assert all([await s.ready() for s in stores])
    finally:
        for s in stores:
            await s.close()


@contextlib.asynccontextmanager
async def _twenty_thousand_devices(pg_url: str) -> AsyncIterator[tuple[PostgresStore, asyncpg.Connection]]:
    """A store open on the database, and a connection to it, with devices d1..d20000, each with a seat (every
    other one borrowed) and an authorization, analyzed."""
    store = PostgresStore(pg_url)
    await store.open()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO seats (item_id, client_uuid, granted_ms, refreshed_ms, expires_ms, code,"
                           " borrowed_until_ms) SELECT 'i' || (g % 3), 'd' || g, g, g + 1, g + 2, 'c',"
                           " CASE WHEN g % 2 = 0 THEN g + 3 END FROM generate_series(1, 20000) g")
        await conn.execute("INSERT INTO authorizations (code, client_uuid, item_id, instances, granted_ms, expires_ms)"
                           " SELECT 'c' || (g % 3), 'd' || g, 'i', 2, g, g + 9 FROM generate_series(1, 20000) g")
        await conn.execute("ANALYZE seats; ANALYZE authorizations")
        yield store, conn
    finally:
        await conn.close()
        await store.close()


async def test_following_reads_a_devices_rows_by_index_not_the_whole_tables(pg_url: str) -> None:
    # What a node re-reads for the devices other nodes changed (store/sql.py reload), with
    # 20,000 seats and authorizations in the tables: by index, never a scan of all of them.
    async with _twenty_thousand_devices(pg_url) as (_, conn):
        for table in ("seats", "authorizations"):
            plan = "\n".join(r[0] for r in await conn.fetch(
                f"EXPLAIN SELECT * FROM {table} WHERE client_uuid IN ('d7', 'd19999')"))
            assert f"Seq Scan on {table}" not in plan and f"{table}_client" in plan, plan


async def test_a_device_load_reads_every_row_of_the_devices_in_one_statement_by_index(pg_url: str) -> None:
    # DeviceCache's load on PostgreSQL (one statement, outside a transaction) gives what the general
    # procedure (three statements) gives, missing devices included, and reads by index.
    async with _twenty_thousand_devices(pg_url) as (store, conn):
        await conn.execute("INSERT INTO seats (item_id, client_uuid, granted_ms, refreshed_ms, expires_ms)"
                           " VALUES ('j', 'd7', 1, 2, 3)")
        await conn.execute("INSERT INTO device_bindings (client_uuid, fingerprint, bound_ms) VALUES ('d8', 'fp', 0)")
        await conn.execute("ANALYZE device_bindings")  # one seat more among 20,000 leaves the statistics as they are
        clients = {"d7", "d8", "d19999", "nobody"}
        seats, auths, bound = await store.device_rows(clients)
        general = await store._call(sql.device_rows(clients))
        assert sorted(seats, key=repr) == sorted(general[0], key=repr) and len(seats) == 4
        assert sorted(auths, key=repr) == sorted(general[1], key=repr) and len(auths) == 3
        assert bound == general[2] == {"d8": "fp"}
        assert {s.borrowed_until is None for s in seats} == {True, False}
        await conn.execute("SET plan_cache_mode = force_generic_plan")  # what a prepared statement ends up with
        await conn.execute(f"PREPARE load (text[]) AS {DEVICE_ROWS}")
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN EXECUTE load ('{d7,d19999}')"))
        assert "Seq Scan on seats" not in plan and "Seq Scan on authorizations" not in plan, plan
        assert "seats_client" in plan and "authorizations_client" in plan, plan


async def test_the_rollups_read_the_marks_of_a_page_of_devices_by_key_in_a_large_table(pg_url: str) -> None:
    # The rollup job reads the marks of up to 500 devices a page (store/sql.py _read_marks). As an IN list of
    # 500 values PostgreSQL 15 read a table of 100,000 devices (random keys, as UUIDs are) whole, each fold
    # page (~11 ms); as an array it probes the key (docs/design.md, "Rows among many values").
    store = PostgresStore(pg_url)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO rollup_clients (client_uuid, id, marks) SELECT md5(g::text), g, '\\x00'"
                           " FROM generate_series(1, 100000) g")
        await conn.execute("ANALYZE rollup_clients")
        wanted = [r[0] for r in await conn.fetch("SELECT client_uuid FROM rollup_clients ORDER BY id % 997, id"
                                                 " LIMIT 500")]
        scans = "SELECT seq_scan, idx_scan FROM pg_stat_user_tables WHERE relname = 'rollup_clients'"
        await conn.execute("SELECT pg_stat_force_next_flush()")
        before = await conn.fetchrow(scans)
        # As the store's procedures are driven, on this connection, so its statistics can be flushed at once.
        rows = await drive(conn, sql._select_in("SELECT client_uuid, id FROM rollup_clients WHERE client_uuid",
                                                {*wanted, "nobody"}))
        assert sorted(c for c, _ in rows) == sorted(wanted)
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        after = await conn.fetchrow(scans)
        assert after["seq_scan"] == before["seq_scan"], (before, after)  # not a scan of the whole table
        assert after["idx_scan"] > before["idx_scan"], (before, after)
    finally:
        await conn.close()


async def test_a_cluster_lock_cut_short_does_not_stay_held_by_a_pooled_connection(pg_url: str) -> None:
    # The pool gives connections back without asyncpg's reset query (no pg_advisory_unlock_all): a block
    # under `exclusive` cancelled while it holds the lock must still leave the lock free for the others.
    store, other = PostgresStore(pg_url), PostgresStore(pg_url)
    await store.open()
    await other.open()
    try:
        inside = asyncio.Event()

        async def hold() -> None:
            async with store.exclusive(4242):
                inside.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(hold())
        await asyncio.wait_for(inside.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(4):  # every connection of the pool in turn: none holds it
            assert await store._fetchval("SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory'"
                                         " AND pid = pg_backend_pid()") == 0
        async with asyncio.timeout(5):
            async with other.exclusive(4242):
                pass
        async with asyncio.timeout(5):  # and a block that ends normally gives it back too
            async with store.exclusive(4242):
                pass
            async with other.exclusive(4242):
                pass
    finally:
        await store.close()
        await other.close()


async def test_the_nodes_rollup_jobs_skip_their_turns_while_another_node_folds(cluster: tuple[Node, Node],
                                                                               pg_url: str) -> None:
    # Another connection holds the rollup lock, as a node in the middle of a long fold would. The nodes'
    # once-a-second rollup jobs do not queue behind it (none waits for that lock over 2.5 s: each would
    # hold a pooled connection and a backend); once it is free they fold what came meanwhile.
    a, _ = cluster
    assert (await a.handshake("dev-1"))[0] == 200
    waiting = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
               " AND classid = $1 AND objid = $2")
    holder = await asyncpg.connect(pg_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK)
            waits = 0
            for _ in range(25):
                waits += await holder.fetchval(waiting, ROLLUP_LOCK >> 32, ROLLUP_LOCK & 0xFFFFFFFF)
                await asyncio.sleep(0.1)
            assert waits == 0
            assert await a.server.services.store.rollup_lag() >= 1
    finally:
        await holder.close()
    deadline = time.monotonic() + 10
    while await a.server.services.store.rollup_lag() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await a.server.services.store.rollup_lag() == 0


async def test_every_node_presents_one_identity(cluster: tuple[Node, Node]) -> None:
    a, b = cluster
    infos = []
    for node in cluster:
        async with node.session.get(f"{node.url}/api/v1/server") as resp:
            infos.append(await resp.json())
    assert infos[0] == infos[1]
    # A grant from one node verifies with the key the other lists.
    from lts_client import verify

    async with a.session.post(f"{a.url}/api/v1/handshake", json={
            "handshakeCode": "216998-P", "clientUuid": "d1", "product": "barcode-reader",
            "deploymentType": "browser"}) as resp:
        text = await resp.read()
    raw = text[len(b'{"authorization":'):text.index(b',"signature":')]
    verify(raw, json.loads(text)["signature"], infos[1]["publicKey"])


async def test_no_oversell_across_nodes(cluster: tuple[Node, Node]) -> None:
    a, b = cluster
    await wait_for(lambda: "216998-P" in b.ledger.codes)
    results = await asyncio.gather(*((a if n % 2 else b).handshake(f"dev-{n}") for n in range(160)))
    granted = [r for r in results if r[0] == 200]
    assert len(granted) == 55, [r for r in results if r[0] not in (200, 403)][:3]
    assert all(r[1]["error"]["code"] == 120 for r in results if r[0] == 403)
    conn = await asyncpg.connect(a.server.config.storage.url)
    try:
        assert await conn.fetchval("SELECT COUNT(*) FROM seats WHERE item_id = 'p1'") == 55
        assert await conn.fetchval(f"SELECT {HELD_SEATS} FROM items WHERE item_id = 'p1'") == 55
    finally:
        await conn.close()


async def test_a_device_keeps_its_seat_on_another_node_and_after_one_stops(cluster: tuple[Node, Node]) -> None:
    a, b = cluster
    await wait_for(lambda: "216998-P" in b.ledger.codes)
    status, first = await a.handshake("laptop")
    assert status == 200
    # At once on the other node, before its change feed may have brought the seat: still one seat.
    status, again = await b.handshake("laptop")
    assert status == 200 and again["authorization"]["itemId"] == "p1"
    await a.server.stop()
    # b's counters follow a's claim within follow_ms (its answer "at once" refreshed the seat found in the database).
    await wait_for(lambda: b.ledger.statuses["p1"].seats_used == 1)
    status, after = await b.handshake("laptop")
    assert status == 200 and after["authorization"]["seats"]["used"] == 1
    assert list((await b.ledger.device("laptop")).seats) == ["p1"]


async def test_a_report_on_one_node_for_a_grant_of_the_other(cluster: tuple[Node, Node], tmp_path: Path,
                                                             vendor: Vendor) -> None:
    a, b = cluster
    await a.server.services.importer.import_bytes("upload:scan.lic", vendor.issue(license_spec("S", items=[
        item("scan", "per-scan", quantity=100)])))
    status, granted = await a.handshake("scanner", code="216998-S")
    assert status == 200
    body = json.dumps({"reportId": "r-1", "clientUuid": "scanner", "handshakeCode": "216998-S", "records": []})
    mac = report_mac(base64.b64decode(granted["reportKey"]), body.encode())
    async with b.session.post(f"{b.url}/api/v1/usage", data=body,
                              headers={"Content-Type": "application/json", MAC_HEADER: mac}) as resp:
        assert resp.status == 200, await resp.text()
    # The same report again on node a: counted once across the cluster.
    async with a.session.post(f"{a.url}/api/v1/usage", data=body,
                              headers={"Content-Type": "application/json", MAC_HEADER: mac}) as resp:
        assert (await resp.json())["duplicate"] is True


async def test_a_report_right_after_a_grant_at_another_node_is_counted(tmp_path: Path, vendor: Vendor,
                                                                       pg_url: str) -> None:
    """A device may report to a node that has not followed the grant (a new report key) yet: it catches up."""
    (tmp_path / "a" / "import").mkdir(parents=True)
    (tmp_path / "a" / "import" / "s.lic").write_bytes(vendor.issue(license_spec("S", items=[
        item("scan", "per-scan", quantity=100)])))
    a = await start_node(tmp_path / "a", vendor, pg_url)
    b = await start_node(tmp_path / "b", vendor, pg_url, follow_ms=60_000)  # follows by itself once a minute
    try:
        for n in range(2):  # the first grant, then a new one (a new report key) for the same device
            status, granted = await a.handshake("scanner", code="216998-S")
            assert status == 200
            status, answer = await _report_scans(b, "scanner", granted["reportKey"], f"r-{n}")
            assert status == 200 and answer["accepted"] == 1, answer
        assert b.ledger.statuses["scan"].units_used == 6
        # A MAC that is wrong after catching up (another key's) is still refused.
        status, _ = await _report_scans(b, "scanner", base64.b64encode(b"\0" * 32).decode(), "r-2")
        assert status == 403
    finally:
        for node in (a, b):
            await stop_node(node)


async def test_a_standby_node_on_the_same_database_serves_when_the_main_is_down_with_the_seats_kept(
        tmp_path: Path, vendor: Vendor, pg_url: str) -> None:
    """server.standby_of on PostgreSQL: error 100 while the main is up; once it is down, the standby serves
    the devices with the seats the main granted (they share the database)."""
    (tmp_path / "main" / "import").mkdir(parents=True)
    (tmp_path / "main" / "import" / "p.lic").write_bytes(vendor.issue(license_spec("P", items=[
        item("p1", quantity=2, expires_at=NOW + timedelta(days=100)), item("p2", quantity=10)])))
    main = await start_node(tmp_path / "main", vendor, pg_url)
    cfg = pg_config(tmp_path / "standby", vendor, pg_url,
                    server={"standby_of": main.url, "standby_check_seconds": 0.2})
    standby_server = Server(config_mod.load(cfg, environ={}), clock=Clock())
    await standby_server.start()
    standby = Node(standby_server, aiohttp.ClientSession())
    try:
        status, body = await standby.handshake("d1")
        assert status == 503 and body["error"]["code"] == 100
        grants = {}
        async with LtsClient([standby.url, main.url]) as client:
            for device in ("d1", "d2"):  # p1's two seats (no grace on 2)
                auth = await client.handshake(handshake_code="216998-P", client_uuid=device,
                                              product="barcode-reader", deployment_type="browser")
                assert auth.server == main.url
                grants[device] = auth.fields["itemId"]
        await stop_node(main)
        await wait_for(lambda: standby.server.services.main_is_up is False)
        async with LtsClient([main.url, standby.url]) as client:
            for device in ("d1", "d2", "d3"):
                auth = await client.handshake(handshake_code="216998-P", client_uuid=device,
                                              product="barcode-reader", deployment_type="browser")
                assert auth.server == standby.url
                assert grants.setdefault(device, auth.fields["itemId"]) == auth.fields["itemId"]
        assert grants == {"d1": "p1", "d2": "p1", "d3": "p2"}  # p1 still full: d3 went on to p2
        conn = await asyncpg.connect(pg_url)
        try:
            assert dict(await conn.fetch(f"SELECT item_id, {HELD_SEATS} FROM items")) == {"p1": 2, "p2": 1}
        finally:
            await conn.close()
    finally:
        await stop_node(standby)


async def test_admin_changes_on_one_node_reach_the_other(cluster: tuple[Node, Node]) -> None:
    a, b = cluster
    token = await admin_login(a.url)
    headers = {"Authorization": f"Bearer {token}"}
    async with b.session.post(f"{b.url}/api/v1/admin/items/p1/revoke", headers=headers) as resp:
        assert resp.status == 200  # the admin account and tokens are the cluster's too
    await wait_for(lambda: a.ledger.statuses["p1"].revoked)
    status, body = await a.handshake("late")
    assert status == 403 and body["error"]["code"] == 113


async def test_restart_on_postgresql_keeps_everything(tmp_path: Path, vendor: Vendor, pg_url: str) -> None:
    (tmp_path / "n" / "import").mkdir(parents=True)
    (tmp_path / "n" / "import" / "p.lic").write_bytes(vendor.issue(license_spec("P", items=[item("p1")])))
    node = await start_node(tmp_path / "n", vendor, pg_url)
    assert (await node.handshake("d1"))[0] == 200
    uuid = node.server.services.identity.server_uuid
    await stop_node(node)
    node = await start_node(tmp_path / "n", vendor, pg_url)
    try:
        assert node.server.services.identity.server_uuid == uuid
        assert [s.client_uuid for s in await node.ledger.store.item_seats("p1", 10)] == ["d1"]
        status, body = await node.handshake("d1")
        assert status == 200 and body["authorization"]["seats"]["used"] == 1
    finally:
        await stop_node(node)


@pytest.mark.parametrize(("storage", "server", "needle"), [
    ({"backend": "postgresql"}, {}, "storage.url"),
    ({"backend": "postgresql", "url": "mysql://x@h/db"}, {}, "storage.url"),
    ({"backend": "postgresql", "url": "postgresql://x@h:port/db"}, {}, "port"),
    ({"backend": "postgresql", "url": "postgresql://x@h:5432"}, {}, "names no database"),
    ({}, {"workers": 2, "port": 0}, "server.port"),
])
def test_bad_storage_settings_are_one_line_and_exit_2(tmp_path: Path, vendor: Vendor, storage: dict, server: dict,
                                                      needle: str) -> None:
    cfg = write_config(tmp_path, vendor, storage={"state_dir": str(tmp_path / "state"), **storage}, server=server)
    proc = subprocess.run([sys.executable, "-m", "lts_server", "--config", str(cfg), "--check-config"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_an_unreachable_database_at_start_up_is_exit_1(tmp_path: Path, vendor: Vendor) -> None:
    cfg = pg_config(tmp_path, vendor, f"postgresql://lts:secret-pw@127.0.0.1:{free_port()}/nothing",
                    storage={"connect_seconds": 2})
    proc = subprocess.run([sys.executable, "-m", "lts_server", "--config", str(cfg)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "unreachable" in proc.stderr
    assert "secret-pw" not in proc.stderr + proc.stdout


def test_workers_share_the_port_and_stop_together(tmp_path: Path, vendor: Vendor, pg_server: Any) -> None:
    url = asyncio.run(pg_server.new_database())
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / "p.lic").write_bytes(vendor.issue(license_spec("P", items=[item("p1", quantity=50)])))
    port = free_port()
    d = start_daemon(pg_config(tmp_path, vendor, url, server={"workers": 2, "port": port}), tmp_path, port=port)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and d.log().count("listening on") < 3:
            time.sleep(0.1)
        assert "2 workers listening" in d.log(), d.log()
        children = subprocess.run(["pgrep", "-P", str(d.proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2

        async def many() -> list[int]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async def one(n: int) -> int:
                    body = {"handshakeCode": "216998-P", "clientUuid": f"w{n}", "product": "barcode-reader",
                            "deploymentType": "browser"}
                    async with s.post(f"{d.url}/api/v1/handshake", json=body) as resp:
                        return resp.status
                return await asyncio.gather(*(one(n) for n in range(80)))

        statuses = asyncio.run(many())
        assert statuses.count(200) == 55 and statuses.count(403) == 25, (sorted(statuses), d.log()[-3000:])
    finally:
        assert stop_daemon(d) == 0
    assert subprocess.run(["pgrep", "-P", str(d.proc.pid)], capture_output=True).returncode == 1


def test_migrate_moves_a_sqlite_deployment_and_the_daemon_starts_on_it(tmp_path: Path, vendor: Vendor,
                                                                       pg_server: Any) -> None:
    url = asyncio.run(pg_server.new_database())
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / "p.lic").write_bytes(vendor.issue(license_spec("P", items=[item("p1", quantity=50)])))
    cfg = write_config(tmp_path, vendor)
    d = start_daemon(cfg, tmp_path)
    token = asyncio.run(admin_login(d.url))

    async def traffic(base: str) -> list[int]:
        async with aiohttp.ClientSession() as s:
            out = []
            for n in range(5):
                body = {"handshakeCode": "216998-P", "clientUuid": f"m{n}", "product": "barcode-reader",
                        "deploymentType": "browser"}
                async with s.post(f"{base}/api/v1/handshake", json=body) as resp:
                    out.append(resp.status)
            return out

    assert asyncio.run(traffic(d.url)) == [200] * 5
    uuid = json.loads(subprocess.run(["curl", "-s", f"{d.url}/api/v1/server"], capture_output=True).stdout)
    assert stop_daemon(d) == 0
    con = sqlite3.connect(tmp_path / "state" / "lts-server.sqlite3")
    events = con.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    con.close()
    run = [sys.executable, "-m", "lts_server", "migrate", "--config", str(cfg), "--to", url]
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split()[-1] for line in proc.stdout.splitlines()[1:-2]}
    assert lines["seats"] == "5" and lines["events"] == f"{events:,}" and lines["admin"] == "1"
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode == 1 and "not empty" in again.stderr
    d = start_daemon(pg_config(tmp_path, vendor, url), tmp_path)
    try:
        async def check() -> None:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{d.url}/api/v1/server") as resp:
                    assert (await resp.json()) == uuid
                async with s.post(f"{d.url}/api/v1/admin/login", json={"password": ADMIN_PASSWORD}) as r:
                    assert r.status == 200
                    moved_token = (await r.json())["token"]
                async with s.get(f"{d.url}/api/v1/admin/items/p1/devices",
                                 headers={"Authorization": f"Bearer {moved_token}"}) as resp:
                    assert len((await resp.json())["devices"]) == 5
        asyncio.run(check())
        assert asyncio.run(traffic(d.url)) == [200] * 5  # refreshes of the seats that moved
    finally:
        assert stop_daemon(d) == 0
    assert token


@pytest.fixture
async def three(tmp_path: Path, vendor: Vendor, pg_url: str) -> AsyncIterator[list[Node]]:
    """Three nodes; node 0 imported license Q: code 216998-Q over q1 (100 seats, expires first) and q2 (100)."""
    (tmp_path / "n0" / "import").mkdir(parents=True)
    (tmp_path / "n0" / "import" / "q.lic").write_bytes(vendor.issue(license_spec("Q", items=[
        item("q1", quantity=100, expires_at=NOW + timedelta(days=100)), item("q2", quantity=100)])))
    nodes = [await start_node(tmp_path / f"n{k}", vendor, pg_url) for k in range(3)]
    for node in nodes:
        await wait_for(lambda node=node: "216998-Q" in node.ledger.codes)
    try:
        yield nodes
    finally:
        for node in nodes:
            await stop_node(node)


async def test_600_devices_over_three_nodes_get_exactly_110_on_each_item(three: list[Node]) -> None:
    results = await asyncio.gather(*(three[n % 3].handshake(f"d{n}", code="216998-Q") for n in range(600)))
    by_item: dict[str, int] = {}
    for status, body in results:
        if status == 200:
            by_item[body["authorization"]["itemId"]] = by_item.get(body["authorization"]["itemId"], 0) + 1
        else:
            assert status == 403 and body["error"]["code"] == 120, body
    assert by_item == {"q1": 110, "q2": 110}
    conn = await asyncpg.connect(three[0].server.config.storage.url)
    try:
        rows = dict(await conn.fetch(f"SELECT item_id, {HELD_SEATS} FROM items"))
        seats = dict(await conn.fetch("SELECT item_id, COUNT(*) FROM seats GROUP BY item_id"))
        devices_twice = await conn.fetchval(
            "SELECT COUNT(*) FROM (SELECT client_uuid FROM seats GROUP BY client_uuid HAVING COUNT(*) > 1) x")
    finally:
        await conn.close()
    assert rows == seats == {"q1": 110, "q2": 110}
    assert devices_twice == 0
    # Everyone past 220 is refused on every node.
    for node in three:
        status, body = await node.handshake(f"late-{id(node)}", code="216998-Q")
        assert status == 403 and body["error"]["code"] == 120


async def test_a_per_scan_quota_used_from_three_nodes(three: list[Node], vendor: Vendor) -> None:
    await three[0].server.services.importer.import_bytes("upload:s.lic", vendor.issue(license_spec("S", items=[
        item("scan", "per-scan", quantity=100)])))
    for node in three:
        await wait_for(lambda node=node: "216998-S" in node.ledger.codes)
    keys = {}
    for k, node in enumerate(three):
        status, body = await node.handshake(f"s{k}", code="216998-S")
        keys[k] = body["reportKey"]

    async def send(k: int, n: int, count: int) -> int:
        node = three[k]
        body = json.dumps({"reportId": f"r{k}-{n}", "clientUuid": f"s{k}", "handshakeCode": "216998-S",
                           "records": [{"slot": _slot(), "product": "barcode-reader", "operation": "scan",
                                        "count": count}]})
        mac = report_mac(base64.b64decode(keys[k]), body.encode())
        async with node.session.post(f"{node.url}/api/v1/usage", data=body,
                                     headers={"Content-Type": "application/json", MAC_HEADER: mac}) as resp:
            return resp.status

    assert set(await asyncio.gather(*(send(k, n, 5) for k in range(3) for n in range(7)))) == {200}  # 105
    for node in three:
        await wait_for(lambda node=node: node.ledger.statuses["scan"].units_used == 105)
        status, body = await node.handshake(f"new-{id(node)}", code="216998-S")
        assert status == 403 and body["error"]["code"] == 120  # quota + grace used up, on every node


async def test_a_report_under_a_key_another_node_just_granted_is_taken_while_an_old_transaction_is_open(
        cluster: tuple[Node, Node], vendor: Vendor, pg_url: str) -> None:
    """The change feed gives final events only: below the oldest transaction in flight anywhere on the
    PostgreSQL server (a psql session left in a transaction holds it back). A node that must see another's
    grant (a usage report under the new key) still takes it in: the report is counted, not refused."""
    a, b = cluster
    await a.server.services.importer.import_bytes("upload:s.lic", vendor.issue(license_spec("S", items=[
        item("scan", "per-scan", quantity=100)])))
    await wait_for(lambda: "216998-S" in b.ledger.codes)
    status, _ = await b.handshake("dev-x", code="216998-S")  # b holds the device, with its first key
    assert status == 200
    idle = await asyncpg.connect(pg_url)
    held = idle.transaction()
    await held.start()
    await idle.fetchval("SELECT pg_current_xact_id()")  # takes a transaction id and keeps it
    try:
        status, body = await a.handshake("dev-x", code="216998-S")  # a new authorization, a new key
        assert status == 200
        status, answer = await _report_scans(b, "dev-x", body["reportKey"], "r-fresh")
        assert status == 200 and answer["accepted"] == 1, answer
    finally:
        await held.rollback()
        await idle.close()


def _slot() -> str:
    from lts_server.core.times import iso, slice_start, utcnow

    return iso(slice_start(utcnow()))


async def _report_scans(node: Node, client: str, report_key: str, report_id: str, count: int = 3) -> tuple[int, dict]:
    """A usage report of `count` scans in this time slice, signed with the device's report key, sent to `node`."""
    body = json.dumps({"reportId": report_id, "clientUuid": client, "handshakeCode": "216998-S",
                       "records": [{"slot": _slot(), "product": "barcode-reader", "operation": "scan",
                                    "count": count}]})
    mac = report_mac(base64.b64decode(report_key), body.encode())
    async with node.session.post(f"{node.url}/api/v1/usage", data=body,
                                 headers={"Content-Type": "application/json", MAC_HEADER: mac}) as resp:
        return resp.status, await resp.json()


async def test_admin_changes_at_one_node_decide_the_next_handshake_at_another_within_a_second(
        three: list[Node], vendor: Vendor) -> None:
    a, b, _ = three
    token = await admin_login(a.url)
    headers = {"Authorization": f"Bearer {token}"}

    async def admin(method: str, path: str, **kw: Any) -> int:
        async with a.session.request(method, f"{a.url}{path}", headers=headers, **kw) as resp:
            return resp.status

    async def within_a_second(client: str, code: str, expected: int) -> None:
        deadline = time.monotonic() + 1.0
        while True:
            status, body = await b.handshake(client, code=code)
            got = 200 if status == 200 else body["error"]["code"]
            if got == expected:
                return
            assert time.monotonic() < deadline, (client, code, got, expected)
            await asyncio.sleep(0.05)

    assert await admin("POST", "/api/v1/admin/handshake-codes", json={
        "organizationId": "216998", "custom": "fleet", "items": ["q2"]}) == 201
    await within_a_second("f1", "216998-fleet", 200)
    assert await admin("PATCH", "/api/v1/admin/handshake-codes/216998-fleet", json={"domains": ["x.example"]}) == 200
    await within_a_second("f2", "216998-fleet", 103)
    assert await admin("DELETE", "/api/v1/admin/handshake-codes/216998-fleet") == 200
    await within_a_second("f3", "216998-fleet", 101)
    assert await admin("POST", "/api/v1/admin/items/q1/revoke") == 200
    assert await admin("POST", "/api/v1/admin/items/q2/revoke") == 200
    await within_a_second("f4", "216998-Q", 113)
    assert await admin("POST", "/api/v1/admin/items/q1/restore") == 200
    await within_a_second("f5", "216998-Q", 200)
    upload = vendor.issue(license_spec("U", items=[item("u1")]))
    async with a.session.post(f"{a.url}/api/v1/admin/licenses?name=u.lic", data=upload, headers=headers) as resp:
        assert resp.status == 201
    await within_a_second("f6", "216998-U", 200)


async def test_a_file_dropped_on_every_node_at_once_imports_once(three: list[Node], vendor: Vendor) -> None:
    data = vendor.issue(license_spec("ONCE", items=[item("once-1")]))
    for node in three:
        (node.server.config.import_dir / "once.lic").write_bytes(data)
    await asyncio.gather(*(node.server.services.importer.scan("test") for node in three))
    conn = await asyncpg.connect(three[0].server.config.storage.url)
    try:
        imported = await conn.fetchval("SELECT COUNT(*) FROM events WHERE type = 'import.imported'"
                                       " AND detail LIKE '%\"ONCE\"%'")
        codes = await conn.fetchval("SELECT COUNT(*) FROM events WHERE type = 'code.created' AND code = '216998-ONCE'")
    finally:
        await conn.close()
    assert (imported, codes) == (1, 1)


async def test_the_database_goes_away_and_comes_back(tmp_path: Path, vendor: Vendor, pg_server: Any) -> None:
    url = await pg_server.new_database()
    (tmp_path / "n" / "import").mkdir(parents=True)
    (tmp_path / "n" / "import" / "p.lic").write_bytes(vendor.issue(license_spec("P", items=[item("p1")])))
    node = await start_node(tmp_path / "n", vendor, url)
    try:
        assert (await node.handshake("before"))[0] == 200
        await asyncio.to_thread(pg_server.halt)
        try:
            for n in range(5):
                async with node.session.post(f"{node.url}/api/v1/handshake", json={
                        "handshakeCode": "216998-P", "clientUuid": f"away-{n}", "product": "barcode-reader",
                        "deploymentType": "browser"}, timeout=aiohttp.ClientTimeout(total=15)) as resp:
                    body = await resp.json()
                    assert resp.status == 503 and resp.headers.get("Retry-After"), body
                    assert "unavailable" in body["error"]["message"] or "storage" in body["error"]["message"]
        finally:
            await asyncio.to_thread(pg_server.launch)
        deadline = time.monotonic() + 20
        while (await node.handshake("after"))[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        conn = await asyncpg.connect(url)
        try:
            held = {r[0] for r in await conn.fetch("SELECT client_uuid FROM seats")}
        finally:
            await conn.close()
        assert held == {"before", "after"}  # what was refused left nothing behind
    finally:
        await stop_node(node)


async def test_a_connection_lost_during_a_commit_answers_that_the_grant_may_have_been_recorded(
        tmp_path: Path, vendor: Vendor, pg_url: str) -> None:
    """The writer's connection ends while its commit is on the way (here: waiting for a row another session
    holds, then terminated): the node cannot know whether it committed, so the 503 must not say "nothing was
    recorded"; the device's retry is granted, and it holds one seat."""
    (tmp_path / "n" / "import").mkdir(parents=True)
    (tmp_path / "n" / "import" / "p.lic").write_bytes(vendor.issue(license_spec("P", items=[item("p1")])))
    node = await start_node(tmp_path / "n", vendor, pg_url)
    conn = await asyncpg.connect(pg_url)
    try:
        assert (await node.handshake("before"))[0] == 200
        holder = conn.transaction()
        await holder.start()
        await conn.execute("SELECT 1 FROM items WHERE item_id = 'p1' FOR UPDATE")
        asked = asyncio.ensure_future(node.session.post(f"{node.url}/api/v1/handshake", json={
            "handshakeCode": "216998-P", "clientUuid": "doubt", "product": "barcode-reader",
            "deploymentType": "browser"}))
        deadline = time.monotonic() + 10
        while not (writer := await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'lts-server writer%'"
                " AND wait_event_type = 'Lock' AND datname = current_database()")):
            assert time.monotonic() < deadline, "the writer never waited for the row"
            await asyncio.sleep(0.02)
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", writer)
        await holder.rollback()
        async with await asked as resp:
            body = await resp.json()
            assert (resp.status, resp.headers.get("Retry-After")) == (503, "5"), body
        assert "may or may not have been recorded" in body["error"]["message"], body
        assert "nothing was recorded" not in body["error"]["message"]
        deadline = time.monotonic() + 20
        while (await node.handshake("doubt"))[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert await conn.fetchval("SELECT COUNT(*) FROM seats WHERE client_uuid = 'doubt'") == 1
    finally:
        await conn.close()
        await stop_node(node)


@dataclass
class Answer:
    """What one device got from the cluster: a grant or an accepted usage report, and when."""

    device: str
    at: float
    server: str
    item_id: str | None = None
    report_id: str | None = None


async def test_kill_9_one_of_three_nodes_under_load_keeps_every_seat_and_answer(
        tmp_path: Path, vendor: Vendor, pg_url: str, daemon_factory: Callable[..., Daemon]) -> None:
    """Devices on the client library with the three nodes' list carry on through a kill -9 and a restart."""
    (tmp_path / "n0" / "import").mkdir(parents=True)
    (tmp_path / "n0" / "import" / "f.lic").write_bytes(vendor.issue(license_spec("F", items=[
        item("f1", quantity=4, expires_at=NOW + timedelta(days=100)), item("f2", quantity=100)])))
    ports = [free_port() for _ in range(3)]
    configs = [pg_config(tmp_path / f"n{k}", vendor, pg_url) for k in range(3)]
    nodes = [daemon_factory(configs[k], port=ports[k]) for k in range(3)]
    urls = [node.url for node in nodes]
    devices = [f"dev-{k}" for k in range(9)]
    answers: list[Answer] = []
    stop = asyncio.Event()

    async def device(k: int) -> None:
        # Each device lists the nodes from a different first one, as a fleet configured in thirds would.
        async with LtsClient(urls[k % 3:] + urls[:k % 3], timeout=10) as client:
            n = 0
            while not stop.is_set():
                auth = await client.handshake(handshake_code="216998-F", client_uuid=devices[k],
                                              product="barcode-reader", deployment_type="browser")
                answers.append(Answer(devices[k], time.monotonic(), auth.server, item_id=auth.fields["itemId"]))
                n += 1
                report_id = f"{devices[k]}-r{n}"
                result = await client.report_usage({
                    "reportId": report_id, "clientUuid": devices[k], "handshakeCode": "216998-F",
                    "records": [{"slot": _slot(), "product": "barcode-reader", "operation": "scan", "count": 1}]})
                assert result["reportId"] == report_id and result["accepted"] in (0, 1)
                answers.append(Answer(devices[k], time.monotonic(), "", report_id=report_id))
                await asyncio.sleep(0.02)

    load = asyncio.gather(*(device(k) for k in range(len(devices))))
    try:
        await asyncio.sleep(2)
        nodes[0].proc.kill()  # kill -9: no goodbye, requests in flight are cut
        killed_at = time.monotonic()
        await asyncio.sleep(3)
        nodes[0] = await asyncio.to_thread(daemon_factory, configs[0], port=ports[0])
        back_at = time.monotonic()

        def back_on_node_0() -> bool:  # once their back-off of it ends (lts_client/failover.py)
            return {a.device for a in answers if a.at > back_at + 0.5 and a.server == urls[0]} == set(devices[::3])

        await wait_for(back_on_node_0, timeout=30)
        await asyncio.sleep(1)
    finally:
        stop.set()
        await load  # a device that could not carry on fails the test here, with its error
    grants = [a for a in answers if a.item_id is not None]
    reports = [a.report_id for a in answers if a.report_id is not None]
    # Every device carried on after the kill, against the other nodes, and the restarted node serves again.
    assert {a.device for a in grants if a.at > killed_at + 0.5 and a.at < back_at} == set(devices)
    assert {a.device for a in grants if a.at > back_at + 0.5 and a.server == urls[0]} == set(devices[::3])
    # Seats intact: each device always got the same item; f1 (4 seats + grace) filled first, nobody twice.
    held = {}
    for a in grants:
        assert held.setdefault(a.device, a.item_id) == a.item_id, a
    conn = await asyncpg.connect(pg_url)
    try:
        seats = {r[0]: r[1] for r in await conn.fetch("SELECT client_uuid, item_id FROM seats")}
        used = dict(await conn.fetch(f"SELECT item_id, {HELD_SEATS} FROM items"))
        granted = dict(await conn.fetch("SELECT client_uuid, COUNT(*) FROM events WHERE type = 'handshake'"
                                        " AND result = 0 GROUP BY client_uuid"))
        stored_reports = {r[0] for r in await conn.fetch("SELECT report_id FROM usage_reports")}
        report_events = await conn.fetchval("SELECT COUNT(*) FROM events WHERE type = 'usage.report'")
        authorized = dict(await conn.fetch("SELECT client_uuid, item_id FROM authorizations"))
    finally:
        await conn.close()
    assert seats == held == authorized
    assert list(held.values()).count("f1") == 4 and used == {"f1": 4, "f2": len(devices) - 4}
    # Every answer a device got is in the database: its grants (a request cut by the kill may have been
    # recorded without an answer, never the reverse) and each accepted report, counted once.
    for name in devices:
        assert granted[name] >= sum(1 for a in grants if a.device == name)
    assert set(reports) <= stored_reports and report_events == len(stored_reports)
    # The restarted node knows the seats the others granted while it was down.
    async with LtsClient([urls[0]]) as client:
        auth = await client.handshake(handshake_code="216998-F", client_uuid=devices[1], product="barcode-reader",
                                      deployment_type="browser")
    assert auth.fields["itemId"] == held[devices[1]] and auth.fields["seats"]["used"] == used[held[devices[1]]]
