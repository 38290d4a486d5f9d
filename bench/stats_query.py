"""Statistics benchmark: stats queries over a log of N usage events (default 10 million).

    .venv/bin/python bench/stats_query.py [--events 10000000] [--queries 30]

Builds a database with N events (handshakes and usage records from 2,000
devices on 20 codes and 40 items over 30 days), folds them into the rollups
with the server's own rollup job, then times GET /api/v1/admin/stats/... for
each bucket size through HTTP and prints the median and p95.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sqlite3
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import aiohttp
from common import NOW, device_item, license_file, vendor_key, write_config

from lts_server import config as config_mod
from lts_server.core.times import to_ms
from lts_server.server import Server

CODES = 20
ITEMS_PER_CODE = 2
DEVICES = 2000
DAYS = 30


def fill(db_path: Path, count: int) -> None:
    """Insert synthetic events straight into the log (as the ledger would have written them)."""
    rng = random.Random(7)
    start = to_ms(NOW - timedelta(days=DAYS))
    span = DAYS * 86_400_000
    con = sqlite3.connect(db_path)
    con.execute("PRAGMA synchronous = OFF")

    def rows(first: int, n: int):  # noqa: ANN202
        for i in range(first, first + n):
            code_n = rng.randrange(CODES)
            item = f"L{code_n}-{rng.randrange(ITEMS_PER_CODE)}"
            at = start + (i * span) // count
            at -= at % 180_000 if i % 2 else 0
            device = f"dev-{rng.randrange(DEVICES)}"
            if i % 2:
                yield (at, "usage.record", f"216998-L{code_n}", item, device, "barcode-reader", None, None,
                       rng.randrange(1, 20))
            else:
                result = 0 if rng.random() < 0.95 else 120
                yield (at, "handshake", f"216998-L{code_n}", item, device, "barcode-reader", "browser", result, None)

    done = 0
    while done < count:
        n = min(500_000, count - done)
        con.execute("BEGIN")
        con.executemany(
            "INSERT INTO events (at_ms, type, code, item_id, client_uuid, product, deployment_type, result, units)"
            " VALUES (?,?,?,?,?,?,?,?,?)", rows(done, n))
        con.execute("COMMIT")
        done += n
    con.close()


async def main(count: int, queries: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        key, pub = vendor_key(folder / "vendor")
        cfg = config_mod.load(write_config(folder, pub, 0), environ={})
        for c in range(CODES):
            (folder / "import" / f"L{c}.lic").write_bytes(license_file(
                key, f"L{c}", [device_item(f"L{c}-{i}", 5000) for i in range(ITEMS_PER_CODE)]))
        server = Server(cfg)
        await server.start()
        await server.stop()
        t = time.perf_counter()
        fill(cfg.database_path, count)
        print(f"filled {count:,} events in {time.perf_counter() - t:.0f} s")
        server = Server(cfg)
        await server.start()
        t = time.perf_counter()
        folded = await server.roll_up()
        print(f"rollups built from {folded:,} events in {time.perf_counter() - t:.0f} s")
        con = sqlite3.connect(cfg.database_path)
        for size, rows, first, last in con.execute(
                "SELECT size, COUNT(*), MIN(bucket_ms), MAX(bucket_ms) FROM rollups GROUP BY size"):
            print(f"  {size}: {rows:,} rollup rows")
        password = "benchmark password"
        async with aiohttp.ClientSession() as session:
            async with session.post(server.urls[0] + "/api/v1/admin/setup", json={"password": password}):
                pass
            async with session.post(server.urls[0] + "/api/v1/admin/login", json={"password": password}) as resp:
                token = (await resp.json())["token"]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
            for path, label in (
                ("codes/216998-L3?bucket=2h&from={d30}", "code, 2h buckets over 30 days"),
                ("codes/216998-L3?bucket=3m&from={d1}", "code, 3m buckets over 1 day"),
                ("codes/216998-L3?bucket=1d&from={d30}", "code, 1d buckets over 30 days"),
                ("items/L3-1?bucket=2h&from={d30}", "item, 2h buckets over 30 days"),
            ):
                url = server.urls[0] + "/api/v1/admin/stats/" + path.format(
                    d30=(NOW - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    d1=(NOW - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"))
                times = []
                for _ in range(queries):
                    t = time.perf_counter()
                    async with session.get(url) as resp:
                        body = await resp.json()
                        assert resp.status == 200, body
                    times.append((time.perf_counter() - t) * 1000)
                times.sort()
                print(f"  {label:34} median {statistics.median(times):6.1f} ms   "
                      f"p95 {times[math.ceil(len(times) * 0.95) - 1]:6.1f} ms   (all-time granted "
                      f"{body['summary']['all']['granted']:,})")
        await server.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--queries", type=int, default=30)
    args = p.parse_args()
    asyncio.run(main(args.events, args.queries))
