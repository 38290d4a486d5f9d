"""Churn benchmark: seat releases and new claims on a full item, claims on another item, all at once.

    .venv/bin/python bench/churn.py [--duration 30] [--claimers 8]

Starts the daemon as its own process on loopback with two licenses: item
FULL (50 seats, 55 with the grace) filled to its limit, and item OTHER
(1,000,000 seats). Then, for --duration seconds: one admin client releases
every device on FULL as fast as it can (DELETE .../devices/{client}); half
of the claimers ask for new devices on FULL (granted while a released seat
is free, else 403/120); the other half claim new devices on OTHER. Prints
the answers by status; any 5xx is a ledger defect (issue: "Exact under
churn"), and the script exits 1 if it saw one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import device_item, free_port, license_file, vendor_key, wait_listening, write_config  # noqa: E402

PASSWORD = "churn benchmark password"


async def drive(url: str, duration: float, claimers: int) -> dict[str, collections.Counter[int]]:
    counts: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    async with aiohttp.ClientSession() as anon:
        async with anon.post(f"{url}/api/v1/admin/setup", json={"password": PASSWORD}) as resp:
            assert resp.status == 201, await resp.text()
        async with anon.post(f"{url}/api/v1/admin/login", json={"password": PASSWORD}) as resp:
            token = (await resp.json())["token"]
    connector = aiohttp.TCPConnector(limit=claimers + 4)
    async with aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {token}"}) as s:
        async def claim(code: str, client: str) -> int:
            body = {"handshakeCode": code, "clientUuid": client, "product": "barcode-reader",
                    "deploymentType": "browser"}
            async with s.post(f"{url}/api/v1/handshake", json=body) as resp:
                await resp.read()
                return resp.status

        for n in range(60):  # fill FULL to its limit (55) and past it
            await claim("216998-FULL", f"fill-{n}")
        stop = time.monotonic() + duration

        async def claimer(code: str, name: str) -> None:
            n = 0
            while time.monotonic() < stop:
                n += 1
                counts[f"claims on {code}"][await claim(code, f"{name}-{n}")] += 1

        async def releaser() -> None:
            while time.monotonic() < stop:
                async with s.get(f"{url}/api/v1/admin/items/FULL-1/devices") as resp:
                    devices = (await resp.json())["devices"]
                for d in devices:
                    async with s.delete(f"{url}/api/v1/admin/items/FULL-1/devices/{d['clientUuid']}") as resp:
                        await resp.read()
                        counts["admin releases on FULL"][resp.status] += 1
                    if time.monotonic() >= stop:
                        return

        half = max(1, claimers // 2)
        await asyncio.gather(releaser(), *(claimer("216998-FULL", f"f{k}") for k in range(half)),
                             *(claimer("216998-OTHER", f"o{k}") for k in range(claimers - half)))
    return counts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--claimers", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        key, pub = vendor_key(folder / "vendor")
        port = free_port()
        cfg = write_config(folder, pub, port)
        (folder / "import" / "full.lic").write_bytes(license_file(key, "FULL", [device_item("FULL-1", 50)]))
        (folder / "import" / "other.lic").write_bytes(license_file(key, "OTHER", [device_item("OTHER-1", 1_000_000)]))
        daemon = subprocess.Popen([sys.executable, "-m", "lts_server", "--config", str(cfg)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, daemon)
            counts = asyncio.run(drive(f"http://127.0.0.1:{port}", args.duration, args.claimers))
        finally:
            daemon.terminate()
            daemon.wait(30)
        con = sqlite3.connect(folder / "state" / "lts-server.sqlite3")
        held, used = con.execute("SELECT (SELECT COUNT(*) FROM seats WHERE item_id = 'FULL-1'), seats_used"
                                 " FROM items WHERE item_id = 'FULL-1'").fetchone()
    total = sum(sum(c.values()) for c in counts.values())
    errors = sum(n for c in counts.values() for status, n in c.items() if status >= 500)
    print(f"{args.duration:.0f} s of churn, {args.claimers} claimers + 1 admin releaser: {total} requests")
    for what, c in sorted(counts.items()):
        print(f"  {what:28} " + "  ".join(f"{status}: {n}" for status, n in sorted(c.items())))
    print(f"  5xx answers: {errors}")
    print(f"  FULL-1 after the run: {held} seats held, counter {used} (limit 55)")
    if errors or held != used or used > 55:
        sys.exit(1)


if __name__ == "__main__":
    main()
