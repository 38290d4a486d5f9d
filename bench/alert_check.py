"""Alert-check benchmark: what one full check costs with 10,000 items and 1,000 handshake codes.

    .venv/bin/python bench/alert_check.py [--items 10000] [--codes 1000] [--checks 20]

Starts a real server on a temporary folder, imports the items as signed
license files (100 items a file), adds handshake codes up to --codes, puts
an hour of 3-minute rollups per code into the database (the failure window
reads them), gives a third of the items seat counts past 60%, then times:

- the pure rules alone (core/alerts.conditions + transition) over that state;
- the first full check (every condition is new: one notification, one
  transaction with 3,000+ condition rows and the outbox rows);
- steady-state full checks (nothing new), which is what runs every 10 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sqlite3
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from common import NOW, device_item, license_file, vendor_key, write_config

from lts_server import config as config_mod
from lts_server.core import alerts as rules
from lts_server.core.codes import CodeFields
from lts_server.core.times import to_ms
from lts_server.core.usage import bucket_start
from lts_server.server import Server

PER_FILE = 100


def fill_rollups(db_path: Path, codes: list[str]) -> None:
    """An hour of 3-minute buckets per code: some refused, as the rollup job would have written them."""
    rng = random.Random(3)
    now_ms = to_ms(NOW)
    rows = []
    for code in codes:
        for b in range(20):
            start = bucket_start(now_ms - b * 180_000, "3m")
            granted = rng.randint(0, 50)
            rows.append(("code", code, "3m", start, granted, rng.randint(0, granted // 4 + 1)))
    con = sqlite3.connect(db_path)
    con.executemany("INSERT OR REPLACE INTO rollups (scope, key, size, bucket_ms, granted, refused)"
                    " VALUES (?,?,?,?,?,?)", rows)
    con.commit()
    con.close()


async def main(n_items: int, n_codes: int, checks: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        key, pub = vendor_key(folder / "vendor")
        cfg_path = write_config(folder, pub, 0)
        for f in range(n_items // PER_FILE):
            items = [device_item(f"I{f:04d}-{i:03d}", quantity=100) for i in range(PER_FILE)]
            (folder / "import" / f"L{f:04d}.lic").write_bytes(license_file(key, f"L{f:04d}", items))
        started = time.perf_counter()
        server = Server(config_mod.load(cfg_path, environ={}), clock=lambda: NOW)
        await server.start()
        print(f"imported {n_items:,} items in {time.perf_counter() - started:.1f} s")
        try:
            services = server.services
            assert services is not None
            ledger = services.ledger
            item_ids = sorted(ledger.items)
            rng = random.Random(5)
            for n in range(n_codes - len(ledger.codes)):
                members = tuple(rng.sample(item_ids, 3))
                await ledger.create_code("216998", CodeFields(custom=f"bench{n}", items=members))
            codes = sorted(ledger.codes)
            await services.alerts.check()  # settle the start-up state
            fill_rollups(server.config.database_path, codes)
            # A third of the items past 60% of their seats (memory only: the check reads the ledger).
            for item_id in item_ids[::3]:
                status = ledger.status(item_id)
                ledger.statuses[item_id] = dataclasses.replace(status, seats_used=rng.randint(60, 100))
            print(f"{len(ledger.items):,} items, {len(codes):,} codes")

            window = rules.FailureWindow()
            requests = {c: rules.CodeRequests(g, r) for c, (g, r) in (await services.store.code_requests_since(
                to_ms(NOW - timedelta(hours=1)))).items()}
            facts = rules.Facts(ledger.items, ledger.statuses, requests)
            pure = []
            for _ in range(checks):
                t0 = time.perf_counter()
                met = rules.conditions(facts, NOW, window)
                rules.transition(met, {})
                pure.append(time.perf_counter() - t0)
            print(f"pure rules: {len(met):,} conditions met; median {statistics.median(pure) * 1000:.1f} ms")

            t0 = time.perf_counter()
            first = await services.alerts.check()
            print(f"first full check: {len(first.new):,} new conditions in one notification: "
                  f"{(time.perf_counter() - t0) * 1000:.1f} ms")
            steady = []
            for _ in range(checks):
                t0 = time.perf_counter()
                outcome = await services.alerts.check()
                steady.append(time.perf_counter() - t0)
                assert not outcome.new
            steady.sort()
            print(f"steady full check (nothing new), {checks} runs: median {statistics.median(steady) * 1000:.1f} ms, "
                  f"max {steady[-1] * 1000:.1f} ms")
        finally:
            await server.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--codes", type=int, default=1_000)
    p.add_argument("--checks", type=int, default=20)
    a = p.parse_args()
    if a.items < PER_FILE or a.items % PER_FILE:  # the items come as files of PER_FILE
        p.error(f"--items must be a positive multiple of {PER_FILE}")
    asyncio.run(main(a.items, a.codes, a.checks))
