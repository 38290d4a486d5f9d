"""Seat-queue benchmark: 10,000 requests waiting for a seat on one node, and what each costs in memory.

    .venv/bin/python bench/seat_queue.py [--waiters 10000] [--store sqlite|postgresql]

Starts the daemon as its own process on loopback with one item of one seat, takes it, then opens
--waiters handshakes with waitSeconds (each its own connection and device). It reports:

- the daemon's RSS before and with every request waiting: per waiter, all it costs (the socket,
  aiohttp's request and handler task, the waiter, the device pinned in memory);
- in a second daemon, the same for --waiters idle keep-alive connections that wait for nothing
  (the connection's share of that);
- the daemon's CPU while they all wait (nothing to do but keep them);
- how long the joins took, and the latency from freeing the seat to the head's grant, for 20
  seats freed one after another (admin release of the holder);
- then stops the daemon: every waiter must get 200 (the few served) or 503 (the rest), never a
  hang or a lost seat.

In-process it also measures, with tracemalloc, the queue's own memory per waiter (the Waiter, its
list entry, its future, its pinned device) on the ledger directly, without HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import NOW, free_port, license_file, vendor_key, wait_listening  # noqa: E402

PASSWORD = "queue benchmark password"
CODE = "216998-Q1"


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def item(quantity: int) -> dict:
    return {"item_id": "seat", "product": "barcode-reader", "deployment_type": "browser",
            "license_type": "per-device", "period": "yearly", "quantity": quantity,
            "starts_at": NOW - timedelta(days=1), "expires_at": NOW + timedelta(days=365)}


def config(folder: Path, pub: Path, port: int, waiters: int, url: str | None) -> Path:
    (folder / "import").mkdir(parents=True, exist_ok=True)
    postgres = f'backend = "postgresql"\nurl = "{url}"\n' if url else ""
    path = folder / "config.toml"
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nmax_connections = {waiters + 500}\n'
        f'idle_timeout = 600\nshutdown_timeout = 30\n'
        f'[storage]\nstate_dir = "{folder / "state"}"\n{postgres}'
        f'[import]\ndirectory = "{folder / "import"}"\nrescan_seconds = 3600\nwatch = false\nsettle_ms = 0\n'
        f'[vendor]\npublic_keys = ["{pub}"]\nallow_unbound = true\n'
        f'[queue]\nmax_wait_s = 600\nmax_waiting = {waiters + 10}\n'
        f'[log]\nlevel = "warning"\nformat = "json"\n')
    return path


async def waiting_count(s: aiohttp.ClientSession, url: str) -> int:
    async with s.get(f"{url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith('lts_item_queue_waiting{item="seat"}'):
                return int(float(line.split()[-1]))
    return 0


async def settle_rss(pid: int) -> int:
    """RSS once it stops moving (the allocator returns or keeps pages lazily)."""
    last = rss(pid)
    for _ in range(20):
        await asyncio.sleep(0.25)
        now = rss(pid)
        if abs(now - last) < 256 * 1024:
            return now
        last = now
    return last


class Daemon:
    """The daemon as its own process, set up with one item of one seat, the holder seated."""

    def __init__(self, waiters: int, url_pg: str | None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="lts-queue-bench-"))
        key, pub = vendor_key(self.folder / "vendor")
        self.port = free_port()
        cfg = config(self.folder, pub, self.port, waiters, url_pg)
        (self.folder / "import" / "q.lic").write_bytes(license_file(key, "Q1", [item(1)]))
        self.proc = subprocess.Popen([sys.executable, "-m", "lts_server", "--config", str(cfg)],
                                     stdout=(self.folder / "daemon.log").open("wb"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin: aiohttp.ClientSession | None = None

    async def start(self) -> aiohttp.ClientSession:
        wait_listening(self.port, self.proc)
        async with aiohttp.ClientSession() as anon:
            async with anon.post(f"{self.url}/api/v1/admin/setup", json={"password": PASSWORD}):
                pass
            async with anon.post(f"{self.url}/api/v1/admin/login", json={"password": PASSWORD}) as resp:
                token = (await resp.json())["token"]
        self.admin = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})
        async with self.admin.post(f"{self.url}/api/v1/handshake", json={**BODY, "clientUuid": "holder"}) as resp:
            assert resp.status == 200, await resp.text()
        return self.admin

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


BODY = {"handshakeCode": CODE, "product": "barcode-reader", "deploymentType": "browser"}


async def idle_connections(waiters: int, url_pg: str | None) -> int:
    """RSS per idle keep-alive connection (each after one /healthz): the connection's own share of a waiter."""
    daemon = Daemon(waiters, url_pg)
    try:
        await daemon.start()
        base = await settle_rss(daemon.proc.pid)
        sessions = []
        for start in range(0, waiters, 500):  # in steps, as run_http paces its waiters: not 10,000 connects at once
            batch = [aiohttp.ClientSession() for _ in range(min(500, waiters - start))]

            async def one(s: aiohttp.ClientSession) -> None:
                async with s.get(f"{daemon.url}/healthz") as r:
                    await r.read()
            await asyncio.gather(*(one(s) for s in batch))
            sessions += batch
        held = await settle_rss(daemon.proc.pid)
        for s in sessions:
            await s.close()
        return round((held - base) / (len(sessions) or 1))
    finally:
        await daemon.stop()


async def run_http(waiters: int, url_pg: str | None) -> dict:
    daemon = Daemon(waiters, url_pg)
    url = daemon.url
    try:
        admin = await daemon.start()
        gc.collect()
        base = await settle_rss(daemon.proc.pid)
        idle_from = cpu_seconds(daemon.proc.pid)
        await asyncio.sleep(5)
        base_cpu = (cpu_seconds(daemon.proc.pid) - idle_from) / 5
        client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                       timeout=aiohttp.ClientTimeout(total=900))
        answers: collections.Counter[int] = collections.Counter()
        granted_at: dict[str, float] = {}

        async def wait_one(n: int) -> None:
            async with client.post(f"{url}/api/v1/handshake",
                                   json={**BODY, "clientUuid": f"w{n}", "waitSeconds": 600}) as resp:
                await resp.read()
                answers[resp.status] += 1
                if resp.status == 200:
                    granted_at[f"w{n}"] = time.perf_counter()

        started = time.perf_counter()
        tasks = []
        for n in range(waiters):
            tasks.append(asyncio.ensure_future(wait_one(n)))
            if n % 200 == 199:
                await asyncio.sleep(0.01)
        while await waiting_count(admin, url) < waiters:
            await asyncio.sleep(0.2)
            if time.perf_counter() - started > 300:
                raise SystemExit(f"only {await waiting_count(admin, url)} joined in 300 s")
        joined = time.perf_counter() - started
        full = await settle_rss(daemon.proc.pid)
        idle_from = cpu_seconds(daemon.proc.pid)
        await asyncio.sleep(5)
        idle_cpu = (cpu_seconds(daemon.proc.pid) - idle_from) / 5

        # Free the seat 20 times: each time the head is granted in the release's own commit.
        latencies = []
        holder = "holder"
        for turn in range(20):
            freed = time.perf_counter()
            async with admin.delete(f"{url}/api/v1/admin/items/seat/devices/{holder}") as resp:
                assert resp.status == 200, await resp.text()
            # The next in ticket order (on PostgreSQL the sequence, not the order the requests were sent).
            while len(granted_at) <= turn:
                await asyncio.sleep(0.001)
            holder = max(granted_at, key=granted_at.__getitem__)
            latencies.append(granted_at[holder] - freed)
        daemon.proc.send_signal(signal.SIGTERM)
        stop_started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        stopped = time.perf_counter() - stop_started
        daemon.proc.wait(60)
        await client.close()
        return {
            "waiters": waiters, "store": "postgresql" if url_pg else "sqlite",
            "rss_base_mb": round(base / 2**20, 1), "rss_waiting_mb": round(full / 2**20, 1),
            "bytes_per_waiter_http": round((full - base) / waiters),
            "daemon_cpu_idle_percent": round(base_cpu * 100, 1),
            "daemon_cpu_while_waiting_percent": round(idle_cpu * 100, 1),
            "join_seconds": round(joined, 2), "joins_per_second": round(waiters / joined),
            "free_to_grant_ms_median": round(sorted(latencies)[len(latencies) // 2] * 1000, 2),
            "free_to_grant_ms_max": round(max(latencies) * 1000, 2),
            "answers": dict(answers), "stop_answered_all_seconds": round(stopped, 2),
            "exit_code": daemon.proc.returncode,
        }
    finally:
        await daemon.stop()


async def run_in_process(waiters: int) -> dict:
    """The queue's own memory per waiter, on the ledger directly (tracemalloc)."""
    sys.path.insert(0, str(HERE.parent))
    from lts_server.core import handshake as hs
    from lts_server.core.model import DeploymentType
    from lts_server.ledger import Ledger
    from lts_server.licensefile import verify
    from lts_server.store.sqlite import SQLiteStore

    folder = Path(tempfile.mkdtemp(prefix="lts-queue-mem-"))
    key, pub = vendor_key(folder / "vendor")
    from lts_server.licensefile import load_trusted
    data = license_file(key, "Q1", [item(1)])
    verified = verify(data, load_trusted([pub]))
    store = SQLiteStore(folder / "db.sqlite3")
    await store.open()
    ledger = Ledger(store, b"s" * 32, max_waiting=waiters + 1000)
    await ledger.start()
    await ledger.record_import("q.lic", verified.sha256, verified.license, verified.key_id, verified.text, None)

    def req(client: str) -> hs.Request:
        return hs.Request(client_uuid=client, product="barcode-reader", deployment_type=DeploymentType.BROWSER,
                          handshake_code=CODE)

    await ledger.handshake(req("holder"))
    deadline = time.monotonic() + 600
    # Warm up the caches and the code paths, then measure.
    warm = [await ledger.handshake(req(f"warm{n}"), wait_until=deadline) for n in range(100)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    outcomes = await asyncio.gather(*(ledger.handshake(req(f"w{n}"), wait_until=deadline) for n in range(waiters)))
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert all(o.waiter is not None for o in outcomes) and all(w.waiter is not None for w in warm)
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    ledger.stop_waiting()
    await ledger.close()
    await store.close()
    shutil.rmtree(folder, ignore_errors=True)
    return {"waiters": waiters, "queue_bytes_per_waiter": round(grown / waiters),
            "note": "Waiter, queue entry, future and the pinned device (tracemalloc), no HTTP"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--waiters", type=int, default=10_000)
    p.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.waiters + 500:  # the daemon, a process of its own, holds the other end
        raise SystemExit(f"the open files limit ({hard}) is too low for {args.waiters} connections")
    pg_urls: list[str | None] = [None, None]
    pg = None
    if args.store == "postgresql":
        sys.path.insert(0, str(HERE.parent))
        from tests import pg as pg_mod
        pg = pg_mod.start()
        pg_urls = [asyncio.run(pg.new_database()), asyncio.run(pg.new_database())]  # one per daemon
    try:
        print(json.dumps(asyncio.run(run_in_process(args.waiters))))
        print(json.dumps(asyncio.run(run_http(args.waiters, pg_urls[0]))))
        print(json.dumps({"bytes_per_idle_connection": asyncio.run(idle_connections(args.waiters, pg_urls[1]))}))
    finally:
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    main()
