"""What a commit costs a node on PostgreSQL: the node's own CPU per plain batch, by the batch's size.

    .venv/bin/python bench/handshake/pg_commit.py [--commits 1000] [--sizes 1,4,16,64]

A node capped at a quarter core commits 7 grants at a time when four nodes share 64 connections and 27-32
when one node has them all, and its CPU per grant rises by half (docs/design.md, "What a commit costs a
node"). This bench measures where a commit's fixed cost goes, in one process, against a throwaway
PostgreSQL server (tests/pg.py, fsync off: the node's CPU, not the flush), each figure the median of 5
rounds, in microseconds of CPU (time.thread_time of each thread, or the process's time.process_time):

- wake-ups: two threads passing a byte back and forth over a socketpair (each side sleeps until the other
  writes), against one thread making the same sends and reads without ever sleeping;
- a round trip: one `SELECT 1` on an asyncpg connection;
- the hop: the store's writer thread (store/postgres.py `_Loop`) running a coroutine that does nothing;
- a commit: `PostgresStore.write` of plain batches (pg_batch: one statement) of g new devices, each a seat
  claim on one item that may take its seat from this node's lease (as a node's claims on an item without
  reservations or caps do), an authorization and two events: CPU of the event loop's thread and of the
  writer's thread per commit, and a least-squares fit of the two together, fixed per commit + per grant.
  The commits go one at a time, on an idle event loop: no HTTP holds the interpreter lock meanwhile, so
  this is what a commit costs at least; in a daemon under load the writer's thread also waits for the lock.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent.parent / "tests"))

import pg  # noqa: E402  (tests/pg.py: a throwaway PostgreSQL server)

from lts_server.core.times import utcnow  # noqa: E402
from lts_server.store import WriteBatch  # noqa: E402
from lts_server.store.postgres import PostgresStore, numbered  # noqa: E402

from batches import ITEM, ITEM_ROW, QUANTITY, grants  # noqa: E402  (bench/handshake/batches.py)

ROUNDS = 5


def wake_ups(n: int) -> tuple[float, float]:
    """CPU per round trip of one byte between two threads (both sleep), and within one thread (neither)."""
    a, b = socket.socketpair()
    try:
        def echo() -> None:
            for _ in range(n):
                b.send(b.recv(1))

        t = threading.Thread(target=echo, daemon=True)  # an interrupted run does not wait for it at exit
        started = time.process_time()
        t.start()
        for _ in range(n):
            a.send(b"x")
            a.recv(1)
        t.join()
        woken = (time.process_time() - started) / n * 1e6
        started = time.process_time()
        for _ in range(n):
            a.send(b"x")
            b.recv(1)
            b.send(b"x")
            a.recv(1)
        return woken, (time.process_time() - started) / n * 1e6
    finally:
        a.close()
        b.close()


async def per_call(fn: Callable[[], Awaitable[object]], n: int) -> float:
    """CPU per call of the whole process (every thread: the hop's work on the writer's thread counts)."""
    started = time.process_time()
    for _ in range(n):
        await fn()
    return (time.process_time() - started) / n * 1e6


async def seed(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO licenses (license_id, alias, organization_id, license_text_version, status, revision,"
            " issued_at, key_id, sha256, file_text, first_imported_ms, updated_ms)"
            " VALUES ('L-BENCH', 'bench', '216998', '1', 'active', 1, '2020-01-01T00:00:00Z', 'k', 's', 't', 0, 0)")
        await conn.execute(numbered(ITEM_ROW), ITEM, QUANTITY)
    finally:
        await conn.close()


def batches(g: int, count: int, first: int) -> list[WriteBatch]:
    """`count` plain batches of `g` new devices each, numbered from `first`."""
    now = utcnow()
    return [grants(now, (f"bench-{first + k * g + j}" for j in range(g)), leasable=True) for k in range(count)]


def writer_thread(store: PostgresStore) -> int:
    """The native id of the store's writer thread, for its CPU clock."""
    name = f"lts-writer-{store.node}"
    ident = next((t.ident for t in threading.enumerate() if t.name == name), None)
    if ident is None:
        raise SystemExit(f"no thread named {name}: store/postgres.py names its writer's thread otherwise now")
    return ident


async def commits(store: PostgresStore, g: int, count: int, first: int) -> tuple[float, float]:
    """CPU per commit of batches of `g`: (the event loop's thread, the writer's thread)."""
    todo = batches(g, count, first)
    clock = time.pthread_getcpuclockid(writer_thread(store))
    loop0, writer0 = time.thread_time(), time.clock_gettime(clock)
    for b in todo:
        await store.write(b)
    return ((time.thread_time() - loop0) / count * 1e6, (time.clock_gettime(clock) - writer0) / count * 1e6)


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares of CPU per commit over the batch size: (fixed per commit, per grant)."""
    slope, intercept = statistics.linear_regression([g for g, _ in points], [c for _, c in points])
    return intercept, slope


async def main(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    # A round trip of one byte is ~10x cheaper than a commit: more of them for a steady figure.
    woken = [wake_ups(args.commits * 5) for _ in range(ROUNDS)]
    print(f"wake-ups, CPU per round trip of one byte: two threads (each sleeps) "
          f"{statistics.median(w for w, _ in woken):.1f} us, one thread (never sleeps) "
          f"{statistics.median(s for _, s in woken):.1f} us")
    server = pg.start(fsync=False)
    try:
        url = await server.new_database()
        store = PostgresStore(url)
        await store.open()
        try:
            await seed(url)
            conn = await asyncpg.connect(url)
            try:
                trip = [await per_call(lambda: conn.execute("SELECT 1"), args.commits) for _ in range(ROUNDS)]
            finally:
                await conn.close()
            print(f"one SELECT 1 round trip (asyncpg): {statistics.median(trip):.0f} us of CPU")

            async def nothing() -> None:
                return None

            hop = [await per_call(lambda: store._thread.call(nothing()), args.commits)  # type: ignore[union-attr]
                   for _ in range(ROUNDS)]
            print(f"the writer thread's hop, a coroutine that does nothing: {statistics.median(hop):.0f} us of CPU")
            made = 0
            points = []
            print("plain commits of g new devices, us of CPU per commit (per grant):")
            for g in sizes:
                runs = []
                for _ in range(ROUNDS):
                    runs.append(await commits(store, g, args.commits, made))
                    made += g * args.commits
                on_loop = statistics.median(r[0] for r in runs)
                on_writer = statistics.median(r[1] for r in runs)
                points.append((g, on_loop + on_writer))
                print(f"  g={g:3d}: event loop {on_loop:6.0f}, writer thread {on_writer:6.0f}, both "
                      f"{on_loop + on_writer:6.0f} ({(on_loop + on_writer) / g:5.1f} per grant)")
            if len(points) > 1:
                fixed, per_grant = fit(points)
                print(f"  fit: {fixed:.0f} us per commit + {per_grant:.1f} us per grant")
            print(f"  batches by path: {dict(store.batches)}")
        finally:
            await store.close()
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=1000, help="commits per round and size")
    parser.add_argument("--sizes", default="1,4,16,64", help="grants per commit, comma-separated")
    asyncio.run(main(parser.parse_args()))
