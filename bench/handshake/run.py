"""Handshake benchmark: lts-server's granted, durable handshakes against a bare aiohttp endpoint.

    .venv/bin/python bench/handshake/run.py [--duration 10] [--connections 64] [--rounds 3]
        [--stores sqlite,postgresql] [--workers 1,2] [--nodes 2] [--modes new,refresh]
        [--baseline DIR]

Every server runs as its own process(es) on loopback and is driven by wrk
(Debian package `wrk`) with the same connection count, in alternating rounds,
so every ratio to the bare endpoint is measured side by side on the same
(noisy, shared) machine. Every lts-server request is granted and committed
durably before the answer (SQLite synchronous=FULL; PostgreSQL with fsync on,
synchronous_commit on), in two modes: `new`, every request a new device
claiming a seat (handshake.lua); `refresh`, --devices devices that were
seated before the rounds asking again, each refreshing its seat
(refresh.lua). Prints medians over rounds, one table per mode; the bare
endpoint is measured once a round and is the same row in both.

--baseline DIR runs every lts-server target a second time from another
source tree (say, `git archive main | tar -x -C DIR`), named "... base":
before and after a change, side by side in one run.

Targets: `bare`; with sqlite in --stores, one daemon per --workers count
(`sqlite w=N`: w=1 the one-process daemon, N > 1 N front processes sharing
the port in front of one writer process); with postgresql in --stores, one
daemon per --workers count (`pg w=N`, N processes sharing the port with
SO_REUSEPORT) and,
with --nodes N > 1, N separate daemons on the same database (`pg nodes=N`):
wrk runs against each of them at once with 1/N of the connections; req/s
are summed, p50 is the mean and p99 the worst of the nodes'. Each PostgreSQL
target has its own database on one throwaway PostgreSQL server (tests/pg.py).

Work per request: CPU time (utime+stime from /proc) of the daemon's
processes and of all PostgreSQL processes over a round, divided by the
granted handshakes of the round; for `sqlite w=N > 1` the writer process's
own share is shown too (`writer us`, included in `daemon us`). On PostgreSQL a sampler also reads pg_locks
every 10 ms to see how often the cluster-wide write lock (store/postgres.py
WRITE_LOCK) is held and how many wait for it (the sampler's own backend is
left out of PostgreSQL's CPU time), and the round's commits are counted (the
distinct xmin of its events): grants per commit and the lock's time per commit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent / "tests"))

import pg  # noqa: E402  (tests/pg.py: a throwaway PostgreSQL server)
from common import (  # noqa: E402
    bound_to,
    cpu_us,
    device_item,
    free_port,
    license_file,
    vendor_key,
    wait_listening,
    write_config,
)

from lts_server.store.postgres import WRITE_LOCK  # noqa: E402

SAMPLE_SECONDS = 0.01
# pg_locks shows a bigint advisory key as classid (high 32 bits) and objid (low 32 bits), objsubid 1.
LOCK_SAMPLE = (
    "SELECT count(*) FILTER (WHERE granted), count(*) FILTER (WHERE NOT granted) FROM pg_locks"
    f" WHERE locktype = 'advisory' AND classid = {WRITE_LOCK >> 32} AND objid = {WRITE_LOCK & 0xFFFFFFFF}"
    " AND objsubid = 1"
)
WARM_BODY = (b'{"handshakeCode":"216998-BENCH","clientUuid":"warm-%d","product":"barcode-reader",'
             b'"deploymentType":"browser"}')
SEATED_BODY = (b'{"handshakeCode":"216998-BENCH","clientUuid":"seated-%d","product":"barcode-reader",'
               b'"deploymentType":"browser"}')
MODES = ("new", "refresh")


@dataclass
class Target:
    name: str
    ports: list[int]
    procs: list[subprocess.Popen[bytes]]
    script: Path
    mode: str = "new"  # new | refresh; the bare endpoint is in both tables
    url: str | None = None  # the PostgreSQL database
    conn: asyncpg.Connection | None = None  # the bench's own connection to it
    sqlite: Path | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)


def wrk_cmd(url: str, duration: int, connections: int, script: Path, *args: str) -> list[str]:
    """wrk's command; `args` go to the script (handshake.lua names devices with the first)."""
    return ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script),
            url, "--", *args]


def parse_wrk(out: str) -> dict[str, float]:
    m = re.search(r"LATENCY p50=([\d.]+) p99=([\d.]+)", out)
    status = re.search(r"STATUS non2xx=(\d+) errors=(\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50": float(m.group(1)), "p99": float(m.group(2)),
            "non2xx": int(status.group(1)), "errors": int(status.group(2))}


async def run_wrk(target: Target, duration: int, connections: int, devices: int = 0) -> dict[str, float]:
    """wrk against every port of the target at once, the connections split between them."""
    share = max(1, connections // len(target.ports))
    path = "/api/v1/handshake" if target.name == "bare" else ""
    procs = [await asyncio.create_subprocess_exec(*wrk_cmd(f"http://127.0.0.1:{port}{path}", duration, share,
                                                           target.script, str(i), str(devices)),
                                                  stdout=asyncio.subprocess.PIPE)
             for i, port in enumerate(target.ports)]
    runs = [parse_wrk((await p.communicate())[0].decode()) for p in procs]
    return {"rps": sum(r["rps"] for r in runs), "requests": sum(r["requests"] for r in runs),
            "p50": statistics.mean(r["p50"] for r in runs), "p99": max(r["p99"] for r in runs),
            "non2xx": sum(r["non2xx"] for r in runs), "errors": sum(r["errors"] for r in runs)}


async def sample_lock(conn: asyncpg.Connection, until: float) -> tuple[int, int, int]:
    """(samples, samples with the write lock held, waiters summed over the samples)."""
    samples = held = waiting = 0
    while time.monotonic() < until:
        granted, waiters = await conn.fetchrow(LOCK_SAMPLE)
        samples += 1
        held += granted > 0
        waiting += waiters
        await asyncio.sleep(SAMPLE_SECONDS)
    return samples, held, waiting


async def round_trip_us(conn: asyncpg.Connection, count: int = 1000) -> float:
    """Median time of one small conditional UPDATE inside a transaction, as the ledger's claims are sent.

    Each claim costs such round trips while the cluster-wide write lock is held, so this, the
    number of statements per commit and the flush time make up the lock's time.
    """
    await conn.execute("CREATE TEMPORARY TABLE rtt (id int PRIMARY KEY, n int)")
    await conn.execute("INSERT INTO rtt VALUES (1, 0)")
    times = []
    async with conn.transaction():
        for _ in range(count):
            started = time.perf_counter()
            await conn.execute("UPDATE rtt SET n = n + 1 WHERE id = $1 AND n < $2", 1, 1 << 30)
            times.append(time.perf_counter() - started)
    await conn.execute("DROP TABLE rtt")
    return statistics.median(times) * 1e6


DB_STATS = ("SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),"
            " SUM(seq_scan), SUM(seq_tup_read), SUM(idx_scan) FROM pg_stat_user_tables")


async def measure(target: Target, duration: int, connections: int, devices: int, server: pg.PgServer | None,
                  probe: asyncpg.Connection | None, probe_pid: int) -> None:
    if target.conn:
        # The tables grow fast here: planner statistics as autovacuum would keep them on a running
        # database (with those of a younger table, PostgreSQL scans whole tables to follow the others).
        await target.conn.execute("ANALYZE")
    daemon_pids = [p.pid for p in target.procs]
    postmaster = int((server.folder / "data" / "postmaster.pid").read_text().split()[0]) if server else 0
    writer = writer_pids(daemon_pids)
    d0, pg0, probe0 = cpu_us(daemon_pids), cpu_us([postmaster]) if server else 0.0, cpu_us([probe_pid])
    w0 = cpu_us(writer)
    last_seq = await target.conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM events") if target.conn else 0
    stats0 = await target.conn.fetchrow(DB_STATS) if target.conn else None
    sampler = None
    if probe and target.conn:
        sampler = asyncio.create_task(sample_lock(probe, time.monotonic() + duration))
    result = await run_wrk(target, duration, connections, devices)
    samples, held, waiting = await sampler if sampler else (0, 0, 0)
    d1, pg1, probe1 = cpu_us(daemon_pids), cpu_us([postmaster]) if server else 0.0, cpu_us([probe_pid])
    w1 = cpu_us(writer)
    granted = max(1, result["requests"] - result["non2xx"])
    result["daemon_us"] = (d1 - d0) / granted
    result["writer_us"] = (w1 - w0) / granted if writer else 0.0
    result["pg_us"] = ((pg1 - pg0) - (probe1 - probe0)) / granted if target.url else 0.0
    if target.conn:
        # Each write transaction's rows share its xmin: distinct xmins count the commits of the round.
        commits = await target.conn.fetchval("SELECT COUNT(DISTINCT xmin::text) FROM events WHERE seq > $1",
                                             last_seq)
        result["lock_held"] = held / samples if samples else 0.0
        result["lock_waiters"] = waiting / samples if samples else 0.0
        result["grants_per_commit"] = granted / max(1, commits)
        result["lock_ms_per_commit"] = result["lock_held"] * duration * 1000 / max(1, commits)
        # Backends report these at most once a second: ~10% off over a 10 s round.
        await target.conn.execute("SELECT pg_stat_clear_snapshot()")
        stats1 = await target.conn.fetchrow(DB_STATS)
        result["xacts"], result["seq_scans"], result["seq_rows"], result["idx_scans"] = (
            (b - a) / granted for a, b in zip(stats0, stats1))
    target.rounds.append(result)


def writer_pids(roots: list[int]) -> list[int]:
    """The writer process among the children of `roots` (server.workers > 1 on SQLite), if there is one."""
    found = []
    for root in roots:
        children = subprocess.run(["pgrep", "-P", str(root)], capture_output=True, text=True).stdout.split()
        for pid in children:
            with contextlib.suppress(OSError):
                if b"--writer" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    found.append(int(pid))
    return found


def warm_up(target: Target) -> None:
    """Every node answers a grant (a node learns of the license imported by another within follow_ms)."""
    deadline = time.monotonic() + 60
    for port in target.ports:
        good = 0
        while good < 10:  # ten in a row, over fresh connections, so every worker behind the port is ready
            if time.monotonic() > deadline:
                raise SystemExit(f"{target.name}: port {port} does not grant handshakes")
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/handshake",
                                             data=WARM_BODY % int(time.monotonic_ns()),
                                             headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(request, timeout=5).close()
                good += 1
            except (urllib.error.URLError, OSError):
                good = 0
                time.sleep(0.2)


async def seat(port: int, devices: int) -> None:
    """Seat devices seated-0 ... seated-(devices-1), so that refresh.lua's requests refresh their seats."""
    async with aiohttp.ClientSession() as session:
        gate = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with gate, session.post(f"http://127.0.0.1:{port}/api/v1/handshake",
                                          data=SEATED_BODY % i, headers={"Content-Type": "application/json"}) as r:
                if r.status != 200:
                    raise SystemExit(f"port {port}: seating seated-{i} answered {r.status}: {await r.text()}")

        await asyncio.gather(*(one(i) for i in range(devices)))


def start_daemon(folder: Path, pub: Path, lic: bytes | None, url: str | None = None,
                 workers: int = 1, tree: Path | None = None,
                 key: Any = None) -> tuple[subprocess.Popen[bytes], int]:
    """A daemon on a free port; with `tree`, lts_server imported from that source tree instead of this one.
    With the vendor `key` (this tree only), the license is issued bound to the daemon's identity key, so
    every answer carries the vendor's binding."""
    port = free_port()
    cfg = write_config(folder, pub, port, url=url, workers=workers)
    if lic and key is not None and tree is None:
        lic = license_file(key, "BENCH", [device_item("BENCH-1", 50_000_000)], **bound_to(folder / "state"))
    if lic:
        (folder / "import" / "bench.lic").write_bytes(lic)
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
    proc = subprocess.Popen([sys.executable, "-m", "lts_server", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, proc)
    return proc, port


async def count_durable(target: Target) -> tuple[int, int]:
    """(seats, granted-handshake events) in the target's database."""
    seats = "SELECT COUNT(*) FROM seats"
    events = "SELECT COUNT(*) FROM events WHERE type = 'handshake' AND result = 0"
    if target.sqlite:
        con = sqlite3.connect(target.sqlite)
        try:
            return con.execute(seats).fetchone()[0], con.execute(events).fetchone()[0]
        finally:
            con.close()
    return await target.conn.fetchval(seats), await target.conn.fetchval(events)


def writer_col(us: float) -> str:
    return f"{us:10.0f}" if us else f"{'-':>10}"


def report(args: argparse.Namespace, targets: list[Target], durable: dict[str, tuple[int, int]],
           rtt: list[float]) -> None:
    def med(t: Target, key: str) -> float:
        return statistics.median(r[key] for r in t.rounds)

    bare = med(targets[0], "rps")
    print(f"wrk -c{args.connections} -d{args.duration}s, {args.rounds} alternating rounds, medians; PostgreSQL fsync"
          f" {args.fsync};"
          " CPU microseconds per granted handshake (per request for bare):")
    width = max(len(t.name) for t in targets)
    for mode in args.modes.split(","):
        print(f"  mode {mode}: " + ("every request a new device claiming a seat" if mode == "new" else
                                    f"{args.devices} seated devices asking again, each refreshing its seat"))
        print(f"  {'target':{width}} {'req/s':>7} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>8}"
              f" {'daemon us':>10} {'writer us':>10} {'pg us':>7} {'lock held':>10} {'waiters':>8} {'grants/commit':>14}"
              f" {'lock ms/commit':>15}")
        for t in targets:
            if t.name != "bare" and t.mode != mode:
                continue
            pg_cols = (f" {med(t, 'pg_us'):7.0f} {med(t, 'lock_held'):10.0%} {med(t, 'lock_waiters'):8.2f}"
                       f" {med(t, 'grants_per_commit'):14.1f} {med(t, 'lock_ms_per_commit'):15.2f}" if t.conn else "")
            print(f"  {t.name:{width}} {med(t, 'rps'):7.0f} {med(t, 'rps') / bare:6.2f} {med(t, 'p50'):7.2f}"
                  f" {med(t, 'p99'):7.2f} {sum(r['non2xx'] + r['errors'] for r in t.rounds):8d}"
                  f" {med(t, 'daemon_us'):10.0f} {writer_col(med(t, 'writer_us'))}" + pg_cols)
    if any(t.conn for t in targets):
        print("  per granted handshake in its PostgreSQL database: transactions (every node's, reads included),"
              " whole-table scans, rows those read, index scans:")
    for t in targets:
        if t.conn:
            print(f"    {t.name + ' ' + t.mode:{width + 8}} {med(t, 'xacts'):6.2f} {med(t, 'seq_scans'):7.3f}"
                  f" {med(t, 'seq_rows'):8.1f} {med(t, 'idx_scans'):7.1f}")
    if rtt:
        print(f"  one statement's round trip to PostgreSQL inside a transaction (median of 1000, before and after"
              f" the rounds): {rtt[0]:.0f} us, {rtt[1]:.0f} us")
    for name, (seats, events) in durable.items():
        # Answers wrk counted as 2xx; every one must have its event (a request cut off at a round's end may
        # have committed without being counted, so the events can only be more).
        acknowledged = sum(r["requests"] - r["non2xx"] for t in targets if t.name == name for r in t.rounds)
        print(f"  {name}: durable: {seats} seats and {events} granted-handshake events committed;"
              f" {acknowledged} granted answers counted in the rounds" + (" (LOST SOME)" if events < acknowledged
                                                                          else ""))


async def bench(args: argparse.Namespace, folder: Path) -> None:
    stores = args.stores.split(",")
    modes = args.modes.split(",")
    key, pub = vendor_key(folder / "vendor")
    lic = license_file(key, "BENCH", [device_item("BENCH-1", 50_000_000)])
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, str(HERE / "bare.py"), str(bare_port), "600"])
    wait_listening(bare_port, bare)
    targets = [Target("bare", [bare_port], [bare], HERE / "post.lua")]
    # One daemon (or set of nodes) per target name; each is measured in every mode (a Target per mode).
    daemons: list[Target] = []
    server = pg.start(fsync=args.fsync == "on") if "postgresql" in stores else None
    probe = None
    trees: list[tuple[str, Path | None]] = [("", None)]
    if args.baseline:
        trees.append((" base", Path(args.baseline).resolve()))
    try:
        for suffix, tree in trees:
            tag = suffix.strip()
            if "sqlite" in stores:
                for workers in (int(w) for w in args.workers.split(",")):
                    where = folder / f"sqlite-w{workers}{tag}"
                    proc, port = start_daemon(where, pub, lic, workers=workers, tree=tree, key=key)
                    daemons.append(Target(f"sqlite w={workers}{suffix}", [port], [proc], HERE / "handshake.lua",
                                          sqlite=where / "state" / "lts-server.sqlite3"))
            if server:
                for workers in (int(w) for w in args.workers.split(",")):
                    url = await server.new_database()
                    proc, port = start_daemon(folder / f"w{workers}{tag}", pub, lic, url, workers, tree=tree, key=key)
                    daemons.append(Target(f"pg w={workers}{suffix}", [port], [proc], HERE / "handshake.lua", url=url))
                if args.nodes > 1:
                    url = await server.new_database()
                    nodes = [start_daemon(folder / f"n{i}{tag}", pub, lic if i == 0 else None, url, tree=tree, key=key)
                             for i in range(args.nodes)]
                    daemons.append(Target(f"pg nodes={args.nodes}{suffix}", [p for _, p in nodes],
                                          [d for d, _ in nodes], HERE / "handshake.lua", url=url))
        if server:
            probe = await asyncpg.connect(server.url())
            for t in daemons:
                if t.url:
                    t.conn = await asyncpg.connect(t.url)
        for t in daemons:
            warm_up(t)
            if t.conn:  # a first load, so the tables have rows worth planning with (see measure)
                await run_wrk(t, 2, args.connections)
            if "refresh" in modes:
                await seat(t.ports[0], args.devices)
        for mode in modes:
            script = HERE / ("handshake.lua" if mode == "new" else "refresh.lua")
            targets += [Target(t.name, t.ports, t.procs, script, mode, t.url, t.conn, t.sqlite) for t in daemons]
        probe_pid = await probe.fetchval("SELECT pg_backend_pid()") if probe else 0
        rtt = [await round_trip_us(probe)] if probe else []
        for _ in range(args.rounds):
            for t in targets:
                await measure(t, args.duration, args.connections, args.devices, server, probe, probe_pid)
        if probe:
            rtt.append(await round_trip_us(probe))
        durable = {t.name: await count_durable(t) for t in daemons}
    finally:
        for t in daemons:
            if t.conn:
                await t.conn.close()
        if probe:
            await probe.close()
        for t in [targets[0], *daemons]:
            for proc in t.procs:
                proc.terminate()
        for t in [targets[0], *daemons]:
            for proc in t.procs:
                proc.wait(30)
        if server:
            server.stop()
    report(args, targets, durable, rtt)
    for t in daemons:
        if t.sqlite:
            con = sqlite3.connect(t.sqlite)
            lag = con.execute("SELECT MAX(seq) - (SELECT last_seq FROM rollup_state) FROM events").fetchone()[0]
            con.close()
            print(f"  {t.name}: statistics rollups trailing the event log at shutdown: {lag} events")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stores", default="sqlite", help="comma-separated: sqlite, postgresql")
    p.add_argument("--workers", default="1,2", help="one daemon per count and store, with server.workers = N")
    p.add_argument("--nodes", type=int, default=2, help="PostgreSQL: N separate daemons on one database (0: none)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated: new (every request a new device), refresh (seated devices asking again)")
    p.add_argument("--devices", type=int, default=5000, help="refresh mode: how many seated devices ask again")
    p.add_argument("--baseline", help="a source tree to run every lts-server target from a second time, side by side")
    p.add_argument("--fsync", choices=("on", "off"), default="on",
                   help="PostgreSQL's fsync; off shows what the disk's flushes cost (not durable)")
    args = p.parse_args()
    if set(args.modes.split(",")) - set(MODES):
        raise SystemExit(f"--modes: each of {', '.join(MODES)}")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
