"""Writes tests/data/previous-release: a state folder (database, gzip'd, and identity) as the release before the
bounded rollups (issue 23) left it after two days of traffic, and the statistics it answered then.

Run it with the code of that release (main at 8aa19d3), from its checkout:

    git -C REPO archive 8aa19d3 | tar -x -C /tmp/old
    cd /tmp/old && REPO/.venv/bin/python REPO/tests/data/previous-release/make.py REPO/tests/data/previous-release

The traffic: per-device, per-concurrent-device, per-concurrent-instance and per-scan items (a license
file and a default code each); devices handshaking every hour, usage reports (some a day late, some with
instances), refusals; the rollups folded every hour and the device marks pruned as that release did.
`meta.json` holds the clock at the end and, per code and item, the statistics answers (3-minute buckets
per day, 2-hour and daily buckets over the two days; the buckets with something in them). tests/test_rollups.py converts the folder with this
release and checks it answers the same.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import sqlite3
import sys
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, os.getcwd())

import aiohttp  # noqa: E402

from lts_server import config as config_mod  # noqa: E402
from lts_server.core.times import iso, slice_start  # noqa: E402
from lts_server.server import Server  # noqa: E402
from tests.conftest import (  # noqa: E402
    NOW,
    Clock,
    Running,
    Vendor,
    admin_login,
    item,
    license_spec,
    make_vendor,
    write_config,
)

SINCE = {"starts_at": NOW - timedelta(days=5)}
FILES = {
    "D": [item("dev", "per-device", quantity=50, **SINCE)],
    "C": [item("conc", "per-concurrent-device", quantity=2, **SINCE)],
    "I": [item("inst", "per-concurrent-instance", quantity=2, **SINCE)],
    "S": [item("scan", "per-scan", quantity=100_000, **SINCE)],
}
HOURS = 48


async def main(out: Path) -> None:
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    vendor = make_vendor(work / "vendor")
    start = NOW.replace(minute=0, second=0) - timedelta(hours=HOURS)
    clock = Clock(start + timedelta(minutes=1))
    cfg = config_mod.load(write_config(work, vendor, storage={"state_dir": str(work / "state")}), environ={})
    server = Server(cfg, clock=clock)
    await server.start()
    try:
        await traffic(server, work, vendor, clock, start, out)
    finally:
        await server.stop()
    save(work, out)


async def traffic(server: Server, work: Path, vendor: Vendor, clock: Clock, start: datetime, out: Path) -> None:
    token = await admin_login(server.urls[0])
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        r = Running(server, server.urls[0], work, vendor, session, clock)
        for name, items in FILES.items():
            await r.drop(f"{name}.lic", vendor.issue(license_spec(name, items=items)))

        def rec(minutes_ago: int = 0, **kw: object) -> dict:
            return {"slot": iso(slice_start(clock() - timedelta(minutes=minutes_ago))), "product": "barcode-reader",
                    "operation": "scan", "count": 1, **kw}

        async def report(client: str, code: str, records: list[dict], rid: str) -> None:
            status, body = await r.report({"reportId": rid, "clientUuid": client, "handshakeCode": code,
                                           "records": records})
            assert status == 200, body

        for hour in range(HOURS):
            for d in range(6):  # per-device: every hour, a few minutes apart
                clock.now = start + timedelta(hours=hour, minutes=1 + 4 * d)
                assert (await r.handshake(handshakeCode="216998-D", clientUuid=f"dev-{d}"))[0] == 200
            clock.now = start + timedelta(hours=hour, minutes=30)
            for d in range(3):  # concurrent devices, each reporting the slices of the last 9 minutes
                assert (await r.handshake(handshakeCode="216998-C", clientUuid=f"conc-{d}"))[0] == 200
                await report(f"conc-{d}", "216998-C", [rec(3 * k) for k in range(3)], f"c-{hour}-{d}")
            for d in range(2):  # servers running instances
                assert (await r.handshake(handshakeCode="216998-I", clientUuid=f"srv-{d}", deploymentType="server",
                                          instances=1 + d))[0] == 200
                await report(f"srv-{d}", "216998-I", [rec(), rec(3)], f"i-{hour}-{d}")
            if hour % 6 == 0:
                for d in range(2):  # scans, and a day-late report once a day
                    assert (await r.handshake(handshakeCode="216998-S", clientUuid=f"scan-{d}"))[0] == 200
                    records = [rec(count=5 + d)] + ([rec(24 * 60 + 30, count=7)] if hour >= 24 else [])
                    await report(f"scan-{d}", "216998-S", records, f"s-{hour}-{d}")
                assert (await r.handshake(handshakeCode="216998-D", clientUuid="stranger", product="nothing"))[0] != 200
            await server.roll_up()
        clock.now = start + timedelta(hours=HOURS, minutes=5)
        await server.roll_up()
        await server.prune_rollup_marks()
        session.headers["Authorization"] = f"Bearer {await admin_login(server.urls[0])}"  # the first one expired
        expected: dict[str, dict] = {}
        first_day = start.replace(hour=0)
        ranges = [(f"3m {d}", "3m", first_day + timedelta(days=d), first_day + timedelta(days=d + 1))
                  for d in range(3)]
        ranges += [("2h", "2h", start, clock.now), ("1d", "1d", first_day, clock.now)]
        for path in [f"codes/216998-{name}" for name in FILES] + [f"items/{i['item_id']}" for v in FILES.values()
                                                                   for i in v]:
            for label, bucket, frm, to in ranges:
                async with session.get(f"{r.url}/api/v1/admin/stats/{path}",
                                       params={"bucket": bucket, "from": iso(frm), "to": iso(to)}) as resp:
                    body = await resp.json()
                    assert resp.status == 200, body
                expected[f"{path} {label}"] = {
                    "params": {"bucket": bucket, "from": iso(frm), "to": iso(to)}, "buckets": len(body["series"]),
                    "series": [b for b in body["series"] if any(v for k, v in b.items() if k != "start")],
                    "summary": body["summary"]}
        overuse = {i: s.overuse_used for i, s in r.ledger.statuses.items()}
    (out / "meta.json").write_text(json.dumps({"now": iso(clock.now), "overuse": overuse, "expected": expected},
                                              sort_keys=True) + "\n")


def save(work: Path, out: Path) -> None:
    shutil.rmtree(out / "state", ignore_errors=True)
    (out / "state").mkdir()
    for name in ("server-uuid", "server-key.pem", "server-secret"):
        shutil.copy2(work / "state" / name, out / "state" / name)
    con = sqlite3.connect(work / "state" / "lts-server.sqlite3")
    con.execute(f"VACUUM INTO '{work / 'vacuumed.sqlite3'}'")
    con.close()
    (out / "state" / "lts-server.sqlite3.gz").write_bytes(gzip.compress((work / "vacuumed.sqlite3").read_bytes(), 9))
    shutil.rmtree(work)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]).resolve()))
