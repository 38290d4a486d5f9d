"""Handshake benchmark: lts-server's granted, durable handshakes against a bare aiohttp endpoint.

    .venv/bin/python bench/handshake/run.py [--duration 10] [--connections 64] [--per-node] [--rounds 3]
        [--stores sqlite,postgresql] [--workers 1,2] [--nodes 2] [--modes new,refresh,items]
        [--node-cpu 0.25] [--latency-ms 1] [--baseline DIR]

Every server runs as its own process(es) on loopback and is driven by wrk
(Debian package `wrk`) with the same connection count, in alternating rounds,
so every ratio to the bare endpoint is measured side by side on the same
(noisy, shared) machine. Every lts-server request is granted and committed
durably before the answer (SQLite synchronous=FULL; PostgreSQL with fsync on,
synchronous_commit on), in three modes: `new`, every request a new device
claiming a seat on one item (handshake.lua); `items`, new devices spread
over 100 items, one code each (handshake.lua with the item count); `refresh`, --devices devices that
were seated before the rounds asking again, each refreshing its seat
(refresh.lua). Prints medians over rounds, one table per mode; the bare
endpoint is measured once a round and is the same row in every table.

--baseline DIR runs every lts-server target a second time from another
source tree (say, `git archive main | tar -x -C DIR`), named "... base":
before and after a change, side by side in one run.

Targets: `bare`; with sqlite in --stores, one daemon per --workers count
(`sqlite w=N`: w=1 the one-process daemon, N > 1 N front processes sharing
the port in front of one writer process); with postgresql in --stores, one daemon per
--workers count (`pg w=N`, N processes sharing the port with SO_REUSEPORT;
0: none) and, per count in --nodes, N separate daemons on one database (`pg
nodes=N`): wrk runs against each of them at once with 1/N of the
connections (with --per-node, each with all of them: the clients grow
with the cluster, so each node sees the load one node alone sees); req/s
are summed, p50 is the mean and p99 the worst of the nodes'. Each
PostgreSQL target has its own database on one throwaway PostgreSQL server
(tests/pg.py). "x 1 node" is a nodes target's rate over
the `pg nodes=1` rate of the same tree and mode.

--node-cpu F caps every lts-server daemon (each node, with its workers) at F
of one core, each in a cgroup of its own (cgroup v1 `cpu.cfs_quota_us`, or
v2 `cpu.max`; needs root); PostgreSQL, wrk and the bare endpoint are not
capped. So the two cores of a small machine are not what limits a cluster of
several nodes, and the scaling from 1 to N nodes shows.

--latency-ms X adds two one-node targets per tree whose database connections
go through bench/pgproxy.py: `pg proxy`, without delay, and `pg +Xms`, every
byte to PostgreSQL X ms later (as `tc netem` would; this kernel has none).
The round trip through each is measured and printed.

Work per request: CPU time (utime+stime from /proc) of the daemon's
processes and of the PostgreSQL processes working for the target (its
database's backends, autovacuum on it, and the server's WAL writer,
checkpointer and background writer; not the other targets' databases, whose
nodes keep following and folding rollups) over a round, divided by the
granted handshakes of the round; for `sqlite w=N > 1` the writer process's
own share is shown too (`writer us`, included in `daemon us`). A round ends once the target's statistics
rollups have folded its events (at most 20 s after wrk stops): their CPU is
part of what a grant costs, on every store alike, and the next target's
round does not pay for it; "(round)" is the CPU while wrk ran only (the
grants' own path, less the tail of their rollups). On PostgreSQL a sampler reads pg_locks
every 10 ms: how often the old cluster-wide write lock (advisory key
0x6C7473_0002, held by the baseline) is held, and how many locks are waited
for per sample - advisory (cluster-wide) ones and the others (rows,
transactions: an item's row, a seat) - (the sampler's own backend is left
out of PostgreSQL's CPU time); and the round's commits are counted (the
distinct xmin of its events): grants per commit and, for the baseline, the
lock's time per commit. "1 statement" is the share of those commits written
as one statement (store/pg_batch.py; the nodes' lts_store_batches_total);
the others went statement by statement. The WAL the whole PostgreSQL server
wrote while a target's round ran (pg_stat_wal: records, full-page images,
bytes) is given per grant, with the checkpoints in its rounds. --statements
also prints each database's top statements (pg_stat_statements) and the
tables read by whole-table scans.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
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
    TICK_US,
    bound_to,
    cpu_us,
    device_item,
    free_port,
    license_file,
    vendor_key,
    wait_listening,
    write_config,
)

SAMPLE_SECONDS = 0.01
# The cluster-wide write lock every commit took before issue 24 (the baseline's store/postgres.py).
OLD_WRITE_LOCK = 0x6C7473_0002
# pg_locks shows a bigint advisory key as classid (high 32 bits) and objid (low 32 bits), objsubid 1.
LOCK_SAMPLE = (
    "SELECT count(*) FILTER (WHERE granted AND locktype = 'advisory'"
    f" AND classid = {OLD_WRITE_LOCK >> 32} AND objid = {OLD_WRITE_LOCK & 0xFFFFFFFF} AND objsubid = 1),"
    " count(*) FILTER (WHERE NOT granted AND locktype = 'advisory'),"
    " count(*) FILTER (WHERE NOT granted AND locktype <> 'advisory') FROM pg_locks"
)
# The licenses of mode `items`: I000 ... I099, one item each (and its default code).
ITEMS = 100
WARM_BODY = (b'{"handshakeCode":"216998-BENCH","clientUuid":"warm-%d","product":"barcode-reader",'
             b'"deploymentType":"browser"}')
SEATED_BODY = (b'{"handshakeCode":"216998-BENCH","clientUuid":"seated-%d","product":"barcode-reader",'
               b'"deploymentType":"browser"}')
MODES = ("new", "refresh", "items")
SCRIPTS = {"new": "handshake.lua", "refresh": "refresh.lua", "items": "handshake.lua"}


@dataclass
class Target:
    name: str
    ports: list[int]
    procs: list[subprocess.Popen[bytes]]
    script: Path
    mode: str = "new"  # new | refresh | items; the bare endpoint is in every table
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
                                                           target.script, str(i), str(devices),
                                                           str(ITEMS if target.mode == "items" else 0)),
                                                  stdout=asyncio.subprocess.PIPE)
             for i, port in enumerate(target.ports)]
    runs = [parse_wrk((await p.communicate())[0].decode()) for p in procs]
    return {"rps": sum(r["rps"] for r in runs), "requests": sum(r["requests"] for r in runs),
            "p50": statistics.mean(r["p50"] for r in runs), "p99": max(r["p99"] for r in runs),
            "non2xx": sum(r["non2xx"] for r in runs), "errors": sum(r["errors"] for r in runs)}


async def sample_lock(conn: asyncpg.Connection, until: float, backends: Backends | None = None
                      ) -> tuple[int, int, int, int]:
    """(samples, samples with the old write lock held, advisory lock waits and other lock waits summed
    over the samples); every tenth sample also notes the target's PostgreSQL backends' CPU."""
    samples = held = advisory = other = 0
    while time.monotonic() < until:
        granted, adv, rows = await conn.fetchrow(LOCK_SAMPLE)
        samples += 1
        held += granted > 0
        advisory += adv
        other += rows
        if backends is not None and samples % 10 == 0:
            await backends.note()
        await asyncio.sleep(SAMPLE_SECONDS)
    return samples, held, advisory, other


def own_cpu_us(pid: int) -> float | None:
    """A process's own CPU (utime + stime), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * TICK_US


class Backends:
    """The CPU of the PostgreSQL processes working for one target: its database's backends (its nodes'
    connections, autovacuum on it) and the server's WAL writer, checkpointer and background writer.
    Other targets' databases are left out: their rollups and followers go on while this one is measured."""

    SQL = ("SELECT pid, backend_type FROM pg_stat_activity WHERE datname = $1 OR backend_type IN"
           " ('walwriter', 'checkpointer', 'background writer')")
    # How the breakdown names them: the nodes' connections, autovacuum, the WAL writer, the rest.
    KINDS = {"client backend": "connections", "autovacuum worker": "autovacuum", "walwriter": "WAL writer"}
    OTHER = "checkpoints, other"
    NAMES = (*KINDS.values(), OTHER)

    def __init__(self, probe: asyncpg.Connection, database: str) -> None:
        self.probe, self.database = probe, database
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.kind: dict[int, str] = {}

    async def note(self, start: bool = False) -> None:
        for pid, backend_type in await self.probe.fetch(self.SQL, self.database):
            used = own_cpu_us(pid)
            if used is None:
                continue
            if start:
                self.first[pid] = used
            self.last[pid] = used
            self.kind[pid] = self.KINDS.get(backend_type, self.OTHER)

    def used_us(self) -> float:
        """CPU since the start: of processes there then, what they used since; of later ones, all."""
        return sum(self.by_kind().values())

    def by_kind(self) -> dict[str, float]:
        kinds = dict.fromkeys(self.NAMES, 0.0)
        for pid, last in self.last.items():
            kinds[self.kind[pid]] += last - self.first.get(pid, 0.0)
        return kinds


async def rollup_lag(target: Target) -> int:
    """Events the target's rollups have yet to fold (this tree keeps a (tx, seq) position, older ones seq)."""
    kinds = "type IN ('handshake', 'usage.record')"
    if target.sqlite:
        con = sqlite3.connect(f"file:{target.sqlite}?mode=ro", uri=True)
        try:
            return con.execute(f"SELECT COUNT(*) FROM events WHERE seq > (SELECT last_seq FROM rollup_state)"
                               f" AND {kinds}").fetchone()[0]
        finally:
            con.close()
    assert target.conn is not None
    # The position as parameters: compared with a subquery's row, (tx, seq) could not use the index.
    try:
        tx, seq = await target.conn.fetchrow("SELECT last_tx, last_seq FROM rollup_state")
    except asyncpg.UndefinedColumnError:
        seq = await target.conn.fetchval("SELECT last_seq FROM rollup_state")
        return await target.conn.fetchval(f"SELECT COUNT(*) FROM events WHERE seq > $1 AND {kinds}", seq)
    return await target.conn.fetchval(f"SELECT COUNT(*) FROM events WHERE (tx, seq) > ($1, $2) AND {kinds}", tx, seq)


async def settle(target: Target, most: float = 20.0) -> None:
    """Wait until the target's statistics rollups have folded the round's events (or `most` seconds), so
    their CPU counts for the round's grants, and the next target's round does not pay it."""
    if target.sqlite is None and target.conn is None:  # the bare endpoint
        return
    deadline = time.monotonic() + most
    while time.monotonic() < deadline and await rollup_lag(target) > 0:
        await asyncio.sleep(0.2)


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


def store_batches(target: Target) -> dict[str, float]:
    """Ledger commits per path (lts_store_batches_total) so far, summed over the target's daemons."""
    total: dict[str, float] = {}
    for port in target.ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for path, n in re.findall(r'^lts_store_batches_total\{path="(\w+)"\} ([\d.e+]+)$', text, re.MULTILINE):
            total[path] = total.get(path, 0) + float(n)
    return total


DB_STATS = ("SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),"
            " SUM(seq_scan), SUM(seq_tup_read), SUM(idx_scan) FROM pg_stat_user_tables")
# Server-wide (WAL has no database): the other targets' nodes only follow and fold while one is measured.
WAL_STATS = ("SELECT wal_records, wal_fpi, wal_bytes,"
             " (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter) FROM pg_stat_wal")


async def measure(target: Target, duration: int, connections: int, devices: int,
                  probe: asyncpg.Connection | None) -> None:
    if target.conn:
        # The tables grow fast here: planner statistics as autovacuum would keep them on a running
        # database (with those of a younger table, PostgreSQL scans whole tables to follow the others).
        await target.conn.execute("ANALYZE")
    daemon_pids = [p.pid for p in target.procs]
    await settle(target)  # what came before (warm-up, the previous round) is not this round's
    backends = Backends(probe, target.url.rsplit("/", 1)[1]) if probe and target.url else None
    if backends is not None:
        await backends.note(start=True)
    d0 = cpu_us(daemon_pids)
    writer = writer_pids(daemon_pids)
    w0 = cpu_us(writer)
    last_seq = await target.conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM events") if target.conn else 0
    paths0 = store_batches(target) if target.conn else {}
    stats0 = await target.conn.fetchrow(DB_STATS) if target.conn else None
    wal0 = await probe.fetchrow(WAL_STATS) if probe and target.conn else None
    sampler = None
    if probe and target.conn:
        sampler = asyncio.create_task(sample_lock(probe, time.monotonic() + duration, backends))
    result = await run_wrk(target, duration, connections, devices)
    samples, held, advisory, other = await sampler if sampler else (0, 0, 0, 0)
    d_round = cpu_us(daemon_pids)
    w_round = cpu_us(writer)
    if backends is not None:
        await backends.note()
    pg_round = backends.used_us() if backends is not None else 0.0
    await settle(target)  # the round's rollups: part of what its grants cost
    if backends is not None:
        await backends.note()
    d1 = cpu_us(daemon_pids)
    granted = max(1, result["requests"] - result["non2xx"])
    result["daemon_us"] = (d1 - d0) / granted
    # While wrk ran only: the grants' own path, without the tail of their statistics rollups.
    result["writer_us"] = (w_round - w0) / granted if writer else 0.0
    result["daemon_round_us"] = (d_round - d0) / granted
    result["pg_round_us"] = pg_round / granted
    # The CPU each daemon (node) got during the round, in cores: under --node-cpu, well below the cap means
    # the machine (other processes, PostgreSQL, wrk) was the limit, not the cap.
    result["node_cores"] = (d_round - d0) / 1e6 / duration / len(target.procs)
    result["pg_us"] = backends.used_us() / granted if backends is not None else 0.0
    if backends is not None:
        result["pg_kinds"] = {kind: used / granted for kind, used in backends.by_kind().items()}
    if target.conn:
        # Each write transaction's rows share its xmin: distinct xmins count the commits of the round.
        commits = await target.conn.fetchval("SELECT COUNT(DISTINCT xmin::text) FROM events WHERE seq > $1",
                                             last_seq)
        result["lock_held"] = held / samples if samples else 0.0
        result["advisory_waits"] = advisory / samples if samples else 0.0
        result["other_waits"] = other / samples if samples else 0.0
        result["grants_per_commit"] = granted / max(1, commits)
        # Batches written as one statement (store/pg_batch.py) among the nodes' commits; the others went
        # statement by statement (store/sql.py write_batch). 0 for a tree without the counter.
        paths1 = store_batches(target)
        sent = {path: paths1.get(path, 0) - paths0.get(path, 0) for path in paths1}
        result["one_statement"] = sent.get("one_statement", 0) / max(1, sum(sent.values()))
        result["lock_ms_per_commit"] = result["lock_held"] * duration * 1000 / max(1, commits)
        # Backends report these at most once a second: ~10% off over a 10 s round.
        await target.conn.execute("SELECT pg_stat_clear_snapshot()")
        stats1 = await target.conn.fetchrow(DB_STATS)
        result["xacts"], result["seq_scans"], result["seq_rows"], result["idx_scans"] = (
            (b - a) / granted for a, b in zip(stats0, stats1))
        if wal0 is not None:
            wal1 = await probe.fetchrow(WAL_STATS)
            result["wal_records"], result["wal_fpi"], result["wal_bytes"] = (
                (float(b) - float(a)) / granted for a, b in zip(wal0[:3], wal1[:3]))
            result["checkpoints"] = wal1[3] - wal0[3]
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


class CpuCap:
    """A cgroup per capped daemon: F of one core for its processes (cgroup v1 cpu controller, or v2)."""

    V1 = Path("/sys/fs/cgroup/cpu")
    V2 = Path("/sys/fs/cgroup")

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.groups: list[Path] = []
        self.v1 = (self.V1 / "cpu.cfs_quota_us").exists()
        if not self.v1 and not (self.V2 / "cgroup.controllers").exists():
            raise SystemExit("--node-cpu: no cgroup cpu controller (v1 /sys/fs/cgroup/cpu or v2 /sys/fs/cgroup)")

    def group(self, name: str) -> Path:
        root = self.V1 if self.v1 else self.V2
        path = root / f"lts-bench-{os.getpid()}-{len(self.groups)}-{re.sub(r'[^a-z0-9]+', '-', name)}"
        path.mkdir()
        period = 100_000
        if self.v1:
            (path / "cpu.cfs_period_us").write_text(str(period))
            (path / "cpu.cfs_quota_us").write_text(str(int(self.fraction * period)))
        else:
            (path / "cpu.max").write_text(f"{int(self.fraction * period)} {period}")
        self.groups.append(path)
        return path

    def remove(self) -> None:
        for path in self.groups:
            for _ in range(50):  # the daemons have exited; the kernel may need a moment to empty it
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def start_daemon(folder: Path, pub: Path, lics: list[bytes], url: str | None = None, workers: int = 1,
                 tree: Path | None = None, cap: CpuCap | None = None,
                 key: Any = None) -> tuple[subprocess.Popen[bytes], int]:
    """A daemon on a free port; with `tree`, lts_server imported from that source tree instead of this one;
    with `cap`, in a cgroup of its own (its workers too) from its first instruction. With the vendor `key`
    (this tree only), the first license is issued bound to the daemon's identity key, so every answer
    carries the vendor's binding."""
    port = free_port()
    cfg = write_config(folder, pub, port, url=url, workers=workers)
    if lics and key is not None and tree is None:
        lics = [license_file(key, "BENCH", [device_item("BENCH-1", 50_000_000)], **bound_to(folder / "state")),
                *lics[1:]]
    for n, lic in enumerate(lics):
        (folder / "import" / f"bench{n}.lic").write_bytes(lic)
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
    procs = cap.group(folder.name) / "cgroup.procs" if cap else None

    def enter_group() -> None:
        if procs is not None:
            procs.write_text(str(os.getpid()))

    # `python -m` puts the working directory first on sys.path: run from the tree, or a checkout's
    # lts_server (this one's, when the bench runs from it) would shadow PYTHONPATH's.
    proc = subprocess.Popen([sys.executable, "-m", "lts_server", "--config", str(cfg)], env=env,
                            cwd=str(tree) if tree else None, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=enter_group)
    wait_listening(port, proc)
    return proc, port


def start_proxy(target_port: int, delay_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE.parent / "pgproxy.py"), str(port), str(target_port),
                             str(delay_ms)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        raise SystemExit("bench/pgproxy.py did not start")
    return proc, port


async def track_statements(server: pg.PgServer) -> None:
    """Restart the server with pg_stat_statements loaded, tracking statements inside functions too."""
    conn = await asyncpg.connect(server.url())
    try:
        await conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    finally:
        await conn.close()
    server.halt()
    server.launch()
    conn = await asyncpg.connect(server.url())
    try:
        await conn.execute("CREATE EXTENSION pg_stat_statements")
        await conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


STATEMENTS = (
    "SELECT calls, total_exec_time, regexp_replace(query, '\\s+', ' ', 'g') FROM pg_stat_statements"
    " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1) ORDER BY total_exec_time DESC LIMIT 12"
)

TABLE_SCANS = ("SELECT relname, seq_scan, seq_tup_read, idx_scan FROM pg_stat_user_tables WHERE seq_scan > 0"
               " ORDER BY seq_tup_read DESC LIMIT 8")


async def top_statements(probe: asyncpg.Connection, targets: list[Target], grants: dict[str, int]) -> None:
    """Per PostgreSQL target, where its database's time went (pg_stat_statements: execution wall time, the
    statements inside functions counted on their own as well as in the call), per granted handshake."""
    for t in targets:
        if t.conn is None:
            continue
        name = t.url.rsplit("/", 1)[1]
        print(f"  {t.name}: statements by execution time, us per granted handshake (calls per grant):")
        for calls, total, text in await probe.fetch(STATEMENTS, name):
            print(f"    {total * 1000 / grants[t.name]:8.1f} ({calls / grants[t.name]:6.3f})  {text[:150]}")
        print(f"  {t.name}: tables by whole-table scans, per granted handshake (scans, rows they read, index scans):")
        for table, scans, rows, index in await t.conn.fetch(TABLE_SCANS):
            n = grants[t.name]
            print(f"    {table:24} {scans / n:7.3f} {rows / n:9.1f} {(index or 0) / n:7.3f}")


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


def base_name(name: str) -> tuple[str, str]:
    """("pg nodes=2 base") -> ("pg nodes=2", " base")."""
    return (name[:-5], " base") if name.endswith(" base") else (name, "")


def report(args: argparse.Namespace, targets: list[Target], durable: dict[str, tuple[int, int]],
           rtt: dict[str, list[float]]) -> None:
    def med(t: Target, key: str) -> float:
        return statistics.median(r[key] for r in t.rounds)

    bare = med(targets[0], "rps")
    cap = f"each lts-server daemon capped at {args.node_cpu:g} of a core" if args.node_cpu else "no CPU caps"
    per_node = " per node" if args.per_node else ""
    print(f"wrk -c{args.connections}{per_node} -d{args.duration}s, {args.rounds} alternating rounds, medians;"
          f" PostgreSQL fsync {args.fsync}; {cap}; CPU microseconds per granted handshake (per request for bare):")
    width = max(len(t.name) for t in targets)
    for mode in args.modes.split(","):
        print(f"  mode {mode}: " + {
            "new": "every request a new device claiming a seat on one item",
            "items": f"every request a new device claiming a seat, spread over {ITEMS} items",
            "refresh": f"{args.devices} seated devices asking again, each refreshing its seat"}[mode])
        print(f"  {'target':{width}} {'req/s':>7} {'ratio':>6} {'x 1 node':>8} {'p50 ms':>7} {'p99 ms':>7}"
              f" {'non-2xx':>8} {'daemon us':>10} {'(round)':>8} {'writer us':>10} {'cores/node':>10} {'pg us':>7} {'(round)':>8}"
              f" {'old lock':>9} {'adv waits':>9} {'row waits':>9} {'grants/commit':>14} {'lock ms/commit':>15}"
              f" {'1 statement':>12}")
        ones = {base_name(t.name)[1]: med(t, "rps") for t in targets
                if t.mode == mode and base_name(t.name)[0] == "pg nodes=1"}
        for t in targets:
            if t.name != "bare" and t.mode != mode:
                continue
            name, suffix = base_name(t.name)
            scale = (f"{med(t, 'rps') / ones[suffix]:8.2f}" if name.startswith("pg nodes=") and suffix in ones
                     else " " * 8)
            pg_cols = (f" {med(t, 'pg_us'):7.0f} {med(t, 'pg_round_us'):8.0f} {med(t, 'lock_held'):9.0%}"
                       f" {med(t, 'advisory_waits'):9.2f}"
                       f" {med(t, 'other_waits'):9.2f} {med(t, 'grants_per_commit'):14.1f}"
                       f" {med(t, 'lock_ms_per_commit'):15.2f} {med(t, 'one_statement'):12.0%}" if t.conn else "")
            print(f"  {t.name:{width}} {med(t, 'rps'):7.0f} {med(t, 'rps') / bare:6.2f} {scale} {med(t, 'p50'):7.2f}"
                  f" {med(t, 'p99'):7.2f} {sum(r['non2xx'] + r['errors'] for r in t.rounds):8d}"
                  f" {med(t, 'daemon_us'):10.0f} {med(t, 'daemon_round_us'):8.0f} {writer_col(med(t, 'writer_us'))}"
                  f" {med(t, 'node_cores'):10.2f}"
                  + pg_cols)
        sqlite = {base_name(t.name)[1]: med(t, "daemon_us") for t in targets
                  if t.mode == mode and base_name(t.name)[0] == "sqlite w=1"}
        for t in targets:
            name, suffix = base_name(t.name)
            if t.mode == mode and t.conn and suffix in sqlite:
                print(f"    {t.name}: daemon CPU per grant {med(t, 'daemon_us') / sqlite[suffix]:.2f} x the SQLite"
                      f" daemon's{suffix}; PostgreSQL CPU per grant {med(t, 'pg_us'):.0f} us")
    def per_database(title: str, line: Callable[[Target], str]) -> None:
        """A line per PostgreSQL target (they measured these), under `title`."""
        databases = [t for t in targets if t.conn]
        if databases:
            print(f"  {title}:")
        for t in databases:
            print(f"    {t.name + ' ' + t.mode:{width + 8}} {line(t)}")

    per_database("per granted handshake in its PostgreSQL database: transactions (every node's, reads included),"
                 " whole-table scans, rows those read, index scans",
                 lambda t: f"{med(t, 'xacts'):6.2f} {med(t, 'seq_scans'):7.3f} {med(t, 'seq_rows'):8.1f}"
                           f" {med(t, 'idx_scans'):7.1f}")
    per_database(f"PostgreSQL CPU per granted handshake by process: {', '.join(Backends.NAMES)} (us)",
                 lambda t: " ".join(f"{statistics.median(r['pg_kinds'][k] for r in t.rounds):6.0f}"
                                    for k in Backends.NAMES))
    per_database("per granted handshake, the whole server's WAL while the target's round ran: records, full-page"
                 " images, bytes; checkpoints in its rounds",
                 lambda t: f"{med(t, 'wal_records'):6.1f} {med(t, 'wal_fpi'):6.2f} {med(t, 'wal_bytes'):8.0f}"
                           f" {sum(r['checkpoints'] for r in t.rounds):4d}")
    for path, (before, after) in rtt.items():
        print(f"  one statement's round trip to PostgreSQL inside a transaction, {path} (median of 1000, before and"
              f" after the rounds): {before:.0f} us, {after:.0f} us")
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
    lics = [license_file(key, "BENCH", [device_item("BENCH-1", 50_000_000)])]
    if "items" in modes:
        lics += [license_file(key, f"I{n:03d}", [device_item(f"I{n:03d}-1", 50_000_000)]) for n in range(ITEMS)]
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, str(HERE / "bare.py"), str(bare_port), "600"])
    wait_listening(bare_port, bare)
    targets = [Target("bare", [bare_port], [bare], HERE / "post.lua")]
    # One daemon (or set of nodes) per target name; each is measured in every mode (a Target per mode).
    daemons: list[Target] = []
    server = pg.start(fsync=args.fsync == "on") if "postgresql" in stores else None
    cap = CpuCap(args.node_cpu) if args.node_cpu else None
    proxies: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    probe = None
    trees: list[tuple[str, Path | None]] = [("", None)]
    if args.baseline:
        trees.append((" base", Path(args.baseline).resolve()))
    workers_list = [int(w) for w in args.workers.split(",") if int(w) > 0]
    nodes_list = [int(n) for n in args.nodes.split(",") if int(n) > 0]
    try:
        if server and args.statements:
            await track_statements(server)
        if server and args.latency_ms:
            proxies = {"through the proxy": start_proxy(server.port, 0),
                       f"through the proxy +{args.latency_ms:g} ms": start_proxy(server.port, args.latency_ms)}
        for suffix, tree in trees:
            tag = suffix.strip()
            if "sqlite" in stores:
                for workers in workers_list or [1]:  # --workers 0 (no PostgreSQL workers): the one-process daemon
                    where = folder / f"sqlite-w{workers}{tag}"
                    proc, port = start_daemon(where, pub, lics, workers=workers, tree=tree, cap=cap, key=key)
                    daemons.append(Target(f"sqlite w={workers}{suffix}", [port], [proc], HERE / SCRIPTS["new"],
                                          sqlite=where / "state" / "lts-server.sqlite3"))
            if server:
                for workers in workers_list:
                    url = await server.new_database()
                    proc, port = start_daemon(folder / f"w{workers}{tag}", pub, lics, url, workers, tree=tree,
                                              cap=cap, key=key)
                    daemons.append(Target(f"pg w={workers}{suffix}", [port], [proc], HERE / SCRIPTS["new"], url=url))
                for count in nodes_list:
                    url = await server.new_database()
                    nodes = [start_daemon(folder / f"n{count}-{i}{tag}", pub, lics if i == 0 else [], url, tree=tree,
                                          cap=cap, key=key) for i in range(count)]
                    daemons.append(Target(f"pg nodes={count}{suffix}", [p for _, p in nodes],
                                          [d for d, _ in nodes], HERE / SCRIPTS["new"], url=url))
                for label, (_, proxy_port) in proxies.items():
                    url = await server.new_database()
                    name = "pg proxy" if label == "through the proxy" else f"pg +{args.latency_ms:g}ms"
                    via = url.replace(f":{server.port}/", f":{proxy_port}/")
                    proc, port = start_daemon(folder / f"{name.replace(' ', '-')}{tag}", pub, lics, via, tree=tree,
                                              cap=cap, key=key)
                    daemons.append(Target(f"{name}{suffix}", [port], [proc], HERE / SCRIPTS["new"], url=url))
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
            targets += [Target(t.name, t.ports, t.procs, HERE / SCRIPTS[mode], mode, t.url, t.conn, t.sqlite)
                        for t in daemons]
        paths: dict[str, asyncpg.Connection] = {"direct": probe} if probe else {}
        for label, (_, proxy_port) in proxies.items():
            paths[label] = await asyncpg.connect(server.url().replace(f":{server.port}/", f":{proxy_port}/"))
        rtt = {label: [await round_trip_us(conn)] for label, conn in paths.items()}
        for _ in range(args.rounds):
            for t in targets:
                await measure(t, args.duration, args.connections * (len(t.ports) if args.per_node else 1),
                              args.devices, probe)
        for label, conn in paths.items():
            rtt[label].append(await round_trip_us(conn))
            if conn is not probe:
                await conn.close()
        durable = {t.name: await count_durable(t) for t in daemons}
        if probe and args.statements:
            grants = {t.name: sum(int(r["requests"] - r["non2xx"]) for u in targets if u.name == t.name
                                  for r in u.rounds) or 1 for t in daemons}
            await top_statements(probe, daemons, grants)
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
        for proc, _ in proxies.values():
            proc.terminate()
            proc.wait(10)
        if cap:
            cap.remove()
        if server:
            server.stop()
    report(args, targets, durable, rtt)
    for t in daemons:
        if t.sqlite:
            con = sqlite3.connect(t.sqlite)
            lag = con.execute("SELECT MAX(seq) - (SELECT last_seq FROM rollup_state) FROM events").fetchone()[0]
            con.close()
            print(f"  {t.name}: statistics rollups trailing the event log at shutdown: {lag} events")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--per-node", action="store_true",
                   help="--connections for each node of a nodes target (the clients grow with the cluster),"
                        " not split between its nodes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stores", default="sqlite", help="comma-separated: sqlite, postgresql")
    p.add_argument("--workers", default="1,2", help="one daemon per count and store, with server.workers = N"
                                                    " (0: none for PostgreSQL)")
    p.add_argument("--nodes", default="2", help="PostgreSQL: per count N, N separate daemons on one database"
                                                " (comma-separated; 0: none)")
    p.add_argument("--modes", default="new,refresh",
                   help="comma-separated: new (every request a new device), items (new devices over 100 items),"
                        " refresh (seated devices asking again)")
    p.add_argument("--devices", type=int, default=5000, help="refresh mode: how many seated devices ask again")
    p.add_argument("--baseline", help="a source tree to run every lts-server target from a second time, side by side")
    p.add_argument("--fsync", choices=("on", "off"), default="on",
                   help="PostgreSQL's fsync; off shows what the disk's flushes cost (not durable)")
    p.add_argument("--node-cpu", type=float, default=0.0,
                   help="cap each lts-server daemon at this share of one core (a cgroup each; needs root)")
    p.add_argument("--statements", action="store_true",
                   help="PostgreSQL: load pg_stat_statements and print where each database's time went")
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="add one-node targets whose PostgreSQL connections go through a proxy: without delay, and"
                        " with this many milliseconds added to every round trip")
    args = p.parse_args()
    # A SIGTERM (timeout, kill) runs the clean-up too: daemons, the PostgreSQL server, the cgroups.
    signal.signal(signal.SIGTERM, _interrupt)
    if set(args.modes.split(",")) - set(MODES):
        raise SystemExit(f"--modes: each of {', '.join(MODES)}")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
