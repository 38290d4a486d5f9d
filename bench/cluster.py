"""The price of zero oversell: three nodes fighting over one hot 100-seat item.

    .venv/bin/python bench/cluster.py [--duration 5] [--concurrency 96] [--rounds 5] [--nodes 3]

Each round starts a fresh database on a throwaway PostgreSQL server
(tests/pg.py, fsync on), three daemons on it, and one license whose only item
has 100 seats (110 with the grace). `--concurrency` client loops, spread
round-robin over the nodes (loop i always asks node i mod N), send
handshakes of new devices, one at a time each, for `--duration` seconds:
the first 110 are granted, the rest refused with 120. Measured: the time from
the first request to the 110th grant (and so grants per second while the
seats fill), answered requests per second over the round and after the item
is full, the answers by outcome, and that exactly 110 were granted - in the
answers, the seats, the item's counter and the event log. Medians over rounds.

The baseline, in the same round with the same nodes and clients (before or
after the hot item, alternating): the time to the first 110 grants on an item
with room to spare, where no node ever races another for the last seats.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import pg  # noqa: E402  (tests/pg.py: a throwaway PostgreSQL server)
from common import device_item, free_port, license_file, vendor_key, wait_listening, write_config  # noqa: E402

SEATS = 100
GRANTS = 110  # 100 seats + 10% grace
HOT = "216998-HOT"
ROOMY = "216998-ROOMY"


@dataclass
class Round:
    full_s: float  # from the first request to the 110th grant on the hot item
    roomy_s: float  # the same clients to the first 110 grants on the item with room
    answered_per_s: float
    after_full_per_s: float
    outcomes: collections.Counter[str]
    seats: int
    counter: int
    events: int

    @property
    def exact(self) -> bool:
        return self.outcomes["granted"] == self.seats == self.counter == self.events == GRANTS


def body(code: str, device: str, product: str = "barcode-reader") -> dict[str, str]:
    return {"handshakeCode": code, "clientUuid": device, "product": product, "deploymentType": "browser"}


async def outcome(session: aiohttp.ClientSession, port: int, payload: dict[str, str]) -> str:
    async with session.post(f"http://127.0.0.1:{port}/api/v1/handshake", json=payload) as r:
        answer = await r.json(content_type=None)
        return "granted" if r.status == 200 else f"{r.status}/{answer.get('error', {}).get('code')}"


async def knows_code(session: aiohttp.ClientSession, port: int, deadline: float) -> None:
    """Wait until the node knows the hot code, without taking a seat: another product is refused with 106."""
    while time.monotonic() < deadline:
        try:
            if await outcome(session, port, body(HOT, "warm-up", "other-product")) == "403/106" and \
                    await outcome(session, port, body(ROOMY, "warm-up", "other-product")) == "403/106":
                return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"node on port {port} never learned of the license")


async def first_grants(session: aiohttp.ClientSession, ports: list[int], concurrency: int) -> float:
    """Seconds until the first 110 grants on the roomy item, with the same clients."""
    grants = 0
    start = time.monotonic()
    end = start + 60
    done_at = float("nan")

    async def client(i: int) -> None:
        nonlocal grants, done_at
        n = 0
        while grants < GRANTS and time.monotonic() < end:
            n += 1
            if await outcome(session, ports[i % len(ports)], body(ROOMY, f"roomy-{i}-{n}")) == "granted":
                grants += 1
                if grants == GRANTS:
                    done_at = time.monotonic() - start

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return done_at


async def one_round(args: argparse.Namespace, server: pg.PgServer, folder: Path, lics: list[bytes],
                    pub: Path, roomy_first: bool) -> Round:
    url = await server.new_database()
    nodes: list[tuple[subprocess.Popen[bytes], int]] = []
    conn = await asyncpg.connect(url)
    try:
        for i in range(args.nodes):
            port = free_port()
            cfg = write_config(folder / f"node{i}", pub, port, url=url)
            if i == 0:  # one node imports; the others learn of it from the database
                for n, lic in enumerate(lics):
                    (folder / f"node{i}" / "import" / f"{n}.lic").write_bytes(lic)
            proc = subprocess.Popen([sys.executable, "-m", "lts_server", "--config", str(cfg)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            nodes.append((proc, port))
        for proc, port in nodes:
            wait_listening(port, proc)
        ports = [port for _, port in nodes]
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            deadline = time.monotonic() + 60
            for port in ports:
                await knows_code(session, port, deadline)
            # A new database has no planner statistics until autovacuum's first pass (up to a minute):
            # until then the followers' `seq > $1 ORDER BY seq LIMIT n` scans the whole events table.
            await conn.execute("ANALYZE")
            # Every client loop opens its connection and is answered a few times before anything is timed.
            await asyncio.gather(*(outcome(session, ports[i % len(ports)],
                                           body(ROOMY, f"warm-{i}-{n}", "other-product"))
                                   for n in range(3) for i in range(args.concurrency)))
            roomy_s = await first_grants(session, ports, args.concurrency) if roomy_first else 0.0
            outcomes: collections.Counter[str] = collections.Counter()
            grant_times: list[float] = []
            answers_after_full = 0
            start = time.monotonic()
            end = start + args.duration

            async def client(i: int) -> None:
                nonlocal answers_after_full
                n = 0
                while time.monotonic() < end:
                    n += 1
                    try:
                        result = await outcome(session, ports[i % len(ports)], body(HOT, f"hot-{i}-{n}"))
                    except aiohttp.ClientError as e:
                        result = f"error/{type(e).__name__}"
                    outcomes[result] += 1
                    if result == "granted":
                        grant_times.append(time.monotonic() - start)
                    elif len(grant_times) >= GRANTS:
                        answers_after_full += 1

            await asyncio.gather(*(client(i) for i in range(args.concurrency)))
            elapsed = time.monotonic() - start
            full_at = sorted(grant_times)[GRANTS - 1] if len(grant_times) >= GRANTS else float("nan")
            if not roomy_first:
                roomy_s = await first_grants(session, ports, args.concurrency)
        seats = await conn.fetchval("SELECT COUNT(*) FROM seats WHERE item_id = 'HOT-1'")
        counter = await conn.fetchval("SELECT seats_used FROM items WHERE item_id = 'HOT-1'")
        events = await conn.fetchval("SELECT COUNT(*) FROM events WHERE type = 'handshake' AND result = 0"
                                     " AND item_id = 'HOT-1'")
    finally:
        await conn.close()
        for proc, _ in nodes:
            proc.terminate()
        for proc, _ in nodes:
            proc.wait(30)
    return Round(full_at, roomy_s, sum(outcomes.values()) / elapsed,
                 answers_after_full / max(1e-9, elapsed - full_at), outcomes, seats, counter, events)


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        key, pub = vendor_key(folder / "vendor")
        lics = [license_file(key, "HOT", [device_item("HOT-1", SEATS)]),
                license_file(key, "ROOMY", [device_item("ROOMY-1", 50_000_000)])]
        server = pg.start(fsync=True)
        try:
            rounds = [await one_round(args, server, folder / f"round{r}", lics, pub, r % 2 == 1)
                      for r in range(args.rounds)]
        finally:
            server.stop()

    full = statistics.median(r.full_s for r in rounds)
    roomy = statistics.median(r.roomy_s for r in rounds)
    print(f"{args.nodes} nodes on one PostgreSQL database, one item of {SEATS} seats, {args.concurrency} client loops"
          f" round-robin over the nodes, {args.duration} s, {args.rounds} rounds, medians:")
    print(f"  110 seats filled in {full * 1000:.0f} ms: {GRANTS / full:.0f} grants/s;"
          f" the first 110 grants on an item with room: {roomy * 1000:.0f} ms ({GRANTS / roomy:.0f} grants/s);"
          f" hot/roomy time: {statistics.median(r.full_s / r.roomy_s for r in rounds):.2f}")
    print(f"  answered {statistics.median(r.answered_per_s for r in rounds):.0f} req/s over the round,"
          f" {statistics.median(r.after_full_per_s for r in rounds):.0f} req/s once full"
          " (refusals are events too: they commit like grants)")
    for i, r in enumerate(rounds):
        print(f"  round {i + 1}: granted answers {r.outcomes['granted']}, seats {r.seats}, counter {r.counter},"
              f" granted events {r.events} ({'exact' if r.exact else 'WRONG'}); filled in {r.full_s * 1000:.0f} ms"
              f" (roomy {r.roomy_s * 1000:.0f} ms); answers {dict(r.outcomes)}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--nodes", type=int, default=3)
    asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    main()
