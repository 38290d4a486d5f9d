"""Seat leases and the event log without a cluster-wide lock (issue 24), on a real PostgreSQL server.

Store by store (no HTTP; tests/test_cluster_faults.py drives daemons): hot items are leased and every
count stays exact, leases come back (idle, stop, a dead node), a node takes a seat another one leased
when the pool is empty, nodes racing never pass the limit, no write takes an advisory lock, and readers
of the log (the change feed, exports, rollups, archives) see each event once although numbers commit
out of order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
from datetime import timedelta

import asyncpg
import pytest

from lts_server.core import leases as rules
from lts_server.core.times import to_ms, utcnow
from lts_server.core.model import SeatLimit
from lts_server.store import CodeLimits, Conflict, Event, EventQuery, Seat, WriteBatch
from lts_server.store.postgres import ROLLUP_LOCK, PostgresStore

# -- the pure rules -------------------------------------------------------------------------------


def test_an_item_is_leased_only_when_hot_and_never_more_than_the_most() -> None:
    assert rules.block_size(rules.HOT_CLAIMS - 1, 64) == 0
    assert rules.block_size(rules.HOT_CLAIMS, 64) == rules.MIN_BLOCK
    assert rules.block_size(10_000, 64) == 64
    assert rules.block_size(400, 64) == 400 // rules.BLOCK_SHARE
    assert rules.block_size(10_000, 0) == 0  # cluster.lease_seats = 0: no leases


def test_timings_bring_a_dead_nodes_seats_back_within_lease_ms() -> None:
    renew, lasts, idle = rules.timings(5000)
    assert (renew, lasts, idle) == (1.25, 2.5, 1.0)
    # Dead right after a renewal: its registration expires `lasts` later, the next sweep comes within `renew`.
    assert lasts + renew < 5.0
    assert rules.timings(400)[2] == 0.1


def test_claim_rate_counts_the_last_window_and_forgets_idle_items() -> None:
    rate = rules.ClaimRate()
    rate.add(["a"] * 10 + ["b"], now=100.0)
    assert rate.recent("a", 100.2) == 10
    rate.add(["a"] * 5, now=100.6)  # a new half-window: the first half still counts
    assert rate.recent("a", 100.7) == 15
    assert rate.recent("a", 101.2) == 5  # the first half-window is over
    assert rate.recent("a", 103.0) == 0
    assert rate.busy(now=101.2, idle=1.0) == ["a"]  # b was last claimed 1.2 s ago


# -- on PostgreSQL ----------------------------------------------------------------------------------

LIMIT = 110


async def _database(pg_server) -> tuple[str, asyncpg.Connection]:  # noqa: ANN001
    url = await pg_server.new_database()
    store = PostgresStore(url)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(url)
    await conn.execute("INSERT INTO licenses (license_id, alias, organization_id, license_text_version, status,"
                       " revision, issued_at, key_id, sha256, file_text, first_imported_ms, updated_ms)"
                       " VALUES ('L', 'L', '216998', '1', 'active', 1, '2024-01-01T00:00:00Z', 'k', 's', 't', 0, 0)")
    for item_id in ("I", "J"):
        await conn.execute("INSERT INTO items (item_id, license_id, organization_id, product, deployment_type,"
                           " license_type, quantity, starts_at, expires_at) VALUES ($1, 'L', '216998', 'p',"
                           " 'browser', 'per-device', 100, '2024-01-01T00:00:00Z', '2099-01-01T00:00:00Z')", item_id)
    return url, conn


def _claims(clients: list[str], item_id: str = "I", limit: int = LIMIT, leasable: bool = True) -> WriteBatch:
    now = utcnow()
    b = WriteBatch(at=now)
    for job, client in enumerate(clients):
        b.begin_job(job)
        b.claim(Seat(item_id, client, now, now, now + timedelta(days=365)), limit, leasable=leasable)
        b.events.append(Event(at=now, type="handshake", code="C", item_id=item_id, client_uuid=client, result=0))
    return b


def _releases(clients: list[str], item_id: str = "I") -> WriteBatch:
    now = utcnow()
    b = WriteBatch(at=now)
    for job, client in enumerate(clients):
        b.begin_job(job)
        b.release(Seat(item_id, client, now, now, now))
    return b


async def _counts(conn: asyncpg.Connection, item_id: str = "I") -> tuple[int, int, int]:
    """(items.seats_used, seats held, seats leased to nodes)."""
    used = await conn.fetchval("SELECT seats_used FROM items WHERE item_id = $1", item_id)
    held = await conn.fetchval("SELECT COUNT(*) FROM seats WHERE item_id = $1", item_id)
    leased = await conn.fetchval("SELECT COALESCE(SUM(seats), 0) FROM seat_leases WHERE item_id = $1", item_id)
    return used, held, leased


async def _wait_for(check, seconds: float) -> float:  # noqa: ANN001
    """Seconds until `check()` is true; fails past `seconds`."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _die(store: PostgresStore) -> None:
    """The node's upkeep stops without a goodbye (no lease given back) and its writer's connection is cut,
    as a kill -9 would leave them."""
    async def no_goodbye(conn: asyncpg.Connection) -> None:
        pass

    async def cut() -> None:
        assert store._writer is not None
        store._writer.terminate()
        store._writer = None

    assert store._upkeep is not None and store._thread is not None
    store.leases.retire = no_goodbye  # type: ignore[method-assign]
    store._upkeep.stop(5)
    store._upkeep = None
    await store._thread.call(cut())


async def test_a_hot_item_is_leased_and_its_counts_stay_exact(pg_server) -> None:  # noqa: ANN001
    url, conn = await _database(pg_server)
    store = PostgresStore(url, lease_ms=60_000)
    await store.open()
    try:
        n = 0
        for _ in range(4):  # 4 batches of 8: hot after the first two
            await store.write(_claims([f"d{n + k}" for k in range(8)]))
            n += 8
        used, held, leased = await _counts(conn)
        assert held == 32 and leased > 0 and used == held + leased
        assert store.batches == {"one_statement": 4}  # plain batches: one round trip each (store/pg_batch.py)
        lease_row = await conn.fetchrow("SELECT node, seats FROM seat_leases WHERE item_id = 'I'")
        assert lease_row["node"] == store.node
        # What a node loads as the item's seats is what is held, not what is leased.
        assert (await store.load_catalog()).statuses["I"].seats_used == 32
        # A release goes through the item's row; the lease stays.
        await store.write(_releases(["d0"]))
        assert await _counts(conn) == (used - 1, 31, leased)
        # The grants from a lease leave the item's row alone: it changed only when blocks were taken.
        before = await conn.fetchval("SELECT xmin::text FROM items WHERE item_id = 'I'")
        await store.write(_claims(["x1"]))  # the lease holds at least one seat
        assert await conn.fetchval("SELECT xmin::text FROM items WHERE item_id = 'I'") == before
        assert await _counts(conn) == (used - 1, 32, leased - 1)
        # A claim the ledger did not mark leasable (a reservation or cap on the item, waiters) never leases.
        await store.write(_claims([f"j{k}" for k in range(40)], item_id="J", leasable=False))
        assert await _counts(conn, "J") == (40, 40, 0)
        # A batch with more than the plain rows (here an item's revocation, an admin's) goes statement by
        # statement, with the same checks; so does one claiming for a code with a cap on the item.
        mixed = _claims(["k1"], item_id="J")
        mixed.revocations["J"] = False
        await store.write(mixed)
        assert store.batches["statements"] == 1 and await _counts(conn, "J") == (41, 41, 0)
        limited = _claims(["k2"], item_id="J")
        limited.seat_changes[0] = dataclasses.replace(limited.seat_changes[0], limited=True, leasable=False)
        with pytest.raises(Conflict, match="has no seat of item J left under its limits"):
            await store.write(limited)
    finally:
        await store.close()
    # Stopping gives every leased seat back and takes the node off the list.
    assert await _counts(conn) == (32, 32, 0)
    assert await conn.fetchval("SELECT COUNT(*) FROM cluster_nodes") == 0
    await conn.close()


async def test_an_idle_lease_goes_back_to_its_item(pg_server) -> None:  # noqa: ANN001
    url, conn = await _database(pg_server)
    store = PostgresStore(url, lease_ms=400)  # renewals every 0.1 s, idle after 0.1 s
    await store.open()
    try:
        for b in range(3):
            await store.write(_claims([f"d{b}-{k}" for k in range(12)]))
        assert (await _counts(conn))[2] > 0

        async def returned() -> bool:
            return await _counts(conn) == (36, 36, 0)

        await _wait_for(returned, 2.0)
    finally:
        await store.close()
        await conn.close()


async def test_a_dead_nodes_leased_seats_come_back_within_lease_ms(pg_server) -> None:  # noqa: ANN001
    url, conn = await _database(pg_server)
    lease_ms = 1000
    dead = PostgresStore(url, lease_ms=lease_ms)
    live = PostgresStore(url, lease_ms=lease_ms)
    await dead.open()
    await live.open()
    try:
        for b in range(3):
            await dead.write(_claims([f"d{b}-{k}" for k in range(12)]))
        used, held, leased = await _counts(conn)
        assert leased > 0
        await _die(dead)
        died = time.monotonic()

        async def returned() -> bool:
            return await _counts(conn) == (held, held, 0)

        await _wait_for(returned, lease_ms / 1000)
        assert time.monotonic() - died < lease_ms / 1000
        assert await conn.fetchval("SELECT COUNT(*) FROM cluster_nodes WHERE node = $1", dead.node) == 0
        # Nothing of the dead node's lease is granted twice: the live node seats the rest, exactly to the limit.
        n = 0
        while True:
            try:
                await live.write(_claims([f"l{n}"]))
            except Conflict:
                break
            n += 1
        assert n == LIMIT - held
        used, held, leased = await _counts(conn)
        assert held == LIMIT and used == held + leased
    finally:
        await dead.close()
        await live.close()
        await conn.close()


async def test_a_node_takes_a_seat_another_node_leased_when_the_pool_is_empty(pg_server) -> None:  # noqa: ANN001
    url, conn = await _database(pg_server)
    a = PostgresStore(url, lease_ms=60_000)
    b = PostgresStore(url, lease_ms=60_000)
    await a.open()
    await b.open()
    try:
        for n in range(3):  # a leases a block while the pool is large
            await a.write(_claims([f"a{n}-{k}" for k in range(12)]))
        used, held, leased = await _counts(conn)
        assert used == held + leased and leased > 0 and held == 36
        # b empties the pool, then takes the seats a leased and is not using; never past the limit.
        granted = 0
        for n in range(LIMIT):
            try:
                await b.write(_claims([f"b{n}"]))
                granted += 1
            except Conflict:
                break
        assert granted == LIMIT - held
        used, held, leased = await _counts(conn)
        assert held == LIMIT and used == held + leased
        assert await conn.fetchval("SELECT seats FROM seat_leases WHERE node = $1", a.node) == 0
        # a's lease was emptied under it: its next grant is refused by the database, not granted twice.
        with pytest.raises(Conflict) as refused:
            await a.write(_claims(["a-late"]))
        assert refused.value.job == 0
        assert (await _counts(conn))[1] == LIMIT
    finally:
        await a.close()
        await b.close()
    assert await _counts(conn) == (LIMIT, LIMIT, 0)
    await conn.close()


async def test_no_leased_seat_is_granted_past_a_lowered_limit(pg_server) -> None:  # noqa: ANN001
    """A renewal with fewer seats while leases are out: the claims' limit is now below the seats taken (held
    + leased). Neither a node's own lease nor another node's lease gives a seat past it; a code's new
    limits give the item's leases back, and the item's row counts exactly again."""
    url, conn = await _database(pg_server)
    a = PostgresStore(url, lease_ms=60_000)
    b = PostgresStore(url, lease_ms=60_000)
    await a.open()
    await b.open()
    try:
        for n in range(4):  # a leases blocks of the hot item
            await a.write(_claims([f"a{n}-{k}" for k in range(12)]))
        used, held, leased = await _counts(conn)
        assert held == 48 and leased > 0 and used == held + leased
        lowered = held  # the renewed quantity: the seats held fill it
        for name, store, leasable in (("a-own-lease", a, True), ("b-others-lease", b, False), ("b", b, True)):
            with pytest.raises(Conflict):
                await store.write(_claims([name], limit=lowered, leasable=leasable))
        assert await _counts(conn) == (used, held, leased)
        # A change of the item's reservations (as a renewal's import) gives every node's lease of it back.
        limits = WriteBatch(at=utcnow())
        limits.code_limits.append(CodeLimits("C", (SeatLimit("I", reserved_seats=0),), ("I",)))
        await b.write(limits)
        assert await _counts(conn) == (held, held, 0)
        await b.write(_claims(["b-room"], limit=lowered + 1))  # through the row: exactly one more
        with pytest.raises(Conflict):
            await a.write(_claims(["a-no-room"], limit=lowered + 1))
        assert await _counts(conn) == (held + 1, held + 1, 0)
    finally:
        await a.close()
        await b.close()
    await conn.close()


async def test_nodes_racing_for_an_item_seat_exactly_the_limit(pg_server) -> None:  # noqa: ANN001
    url, conn = await _database(pg_server)
    stores = [PostgresStore(url, lease_ms=60_000) for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        async def claim(k: int, s: PostgresStore) -> int:
            granted = 0
            for n in range(60):
                batch = [f"s{k}-{n}-{j}" for j in range(3)]
                try:
                    await s.write(_claims(batch))
                    granted += len(batch)
                except Conflict:  # the batch as a whole is refused; one device at a time now
                    for client in batch:
                        try:
                            await s.write(_claims([client]))
                            granted += 1
                        except Conflict:
                            pass
            return granted

        # One seat each first, so every node's events are in the log whoever wins the race (in a full suite run
        # on a loaded machine one node once granted all 110: one distinct node in the events, not four).
        for k, s in enumerate(stores):
            await s.write(_claims([f"first-{k}"]))
        granted = await asyncio.gather(*(claim(k, s) for k, s in enumerate(stores)))
        assert sum(granted) + len(stores) == LIMIT
        used, held, leased = await _counts(conn)
        assert held == LIMIT and used == held + leased
        # Four nodes, one event per seat, each event read once by a fifth reader.
        assert await conn.fetchval("SELECT COUNT(DISTINCT node) FROM events") == 4
        assert len([e async for e in stores[0].events(EventQuery())]) == LIMIT
    finally:
        for s in stores:
            await s.close()
    assert await _counts(conn) == (LIMIT, LIMIT, 0)
    await conn.close()


async def test_no_advisory_lock_is_taken_by_a_write(pg_server) -> None:  # noqa: ANN001
    """A batch's transaction holds no lock every node's commits wait for (issue 24, item 1)."""
    url, conn = await _database(pg_server)
    store = PostgresStore(url)
    await store.open()
    try:
        seen: list[int] = []
        writing = asyncio.ensure_future(asyncio.gather(*(store.write(_claims([f"d{n}"])) for n in range(20))))
        while not writing.done():
            seen.append(await conn.fetchval("SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory'"))
            await asyncio.sleep(0)
        await writing
        assert set(seen) == {0}
    finally:
        await store.close()
        await conn.close()


async def test_the_rollup_job_skips_its_turn_while_another_node_folds(pg_server) -> None:  # noqa: ANN001
    # The background job (wait=False) does not queue a connection behind the node that is folding: it folds
    # nothing and returns at once. An explicit fold (wait=True: Server.roll_up, what tests and tools call)
    # waits for its turn and then folds everything.
    url, conn = await _database(pg_server)
    store = PostgresStore(url)
    await store.open()
    folding = await asyncpg.connect(url)  # another node, in the middle of a fold
    try:
        await store.write(_claims(["a", "b", "c"]))
        tx = folding.transaction()
        await tx.start()
        await folding.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK)
        # The other node holds the lock for good here: waiting for it would time out.
        assert (await asyncio.wait_for(store.roll_up({}, 100, wait=False), 5)).processed == 0
        assert (await asyncio.wait_for(store.count_borrowed_slices(to_ms(utcnow()), {}, wait=False), 5)
                ).processed == 0
        assert await store.rollup_lag() == 3
        waiting = asyncio.create_task(store.roll_up({}, 100))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # its turn has not come
        await tx.commit()
        assert (await waiting).processed == 3
        assert (await store.roll_up({}, 100, wait=False)).processed == 0  # nothing left, nobody folding
        assert await store.rollup_lag() == 0
    finally:
        await folding.close()
        await store.close()
        await conn.close()


async def test_readers_see_each_event_once_though_numbers_commit_out_of_order(pg_server, tmp_path) -> None:  # noqa: ANN001
    url, conn = await _database(pg_server)
    store = PostgresStore(url)
    other = PostgresStore(url)  # another node: its feed shows what `store` writes
    await store.open()
    await other.open()
    try:
        start = await other.log_position()
        slow = await asyncpg.connect(url)
        tx = slow.transaction()
        await tx.start()
        # A transaction takes number s1 first and commits last.
        s1 = await slow.fetchval("INSERT INTO events (at_ms, type, client_uuid) VALUES (0, 'handshake', 'slow')"
                                 " RETURNING seq")
        await store.write(_claims(["fast"]))  # number s2 > s1, committed first
        s2 = await conn.fetchval("SELECT seq FROM events WHERE client_uuid = 'fast'")
        assert s2 > s1
        # Not final yet: an older transaction is in flight. No reader passes s1 by.
        early = await other.changes_since(start)
        assert early.events == [] and not early.more
        assert [e.event.client_uuid async for e in other.events(EventQuery())] == []
        assert (await other.roll_up({}, 100)).processed == 0
        horizon = await other.archive_horizon(to_ms(utcnow()) + 1)
        assert await other.archivable_page(0, horizon, to_ms(utcnow()) + 1, 100) == []
        await tx.commit()
        await slow.close()
        changes = await other.changes_since(early.upto)
        assert [e.client_uuid for e in changes.events] == ["slow", "fast"]  # the writers' order
        assert (await other.changes_since(changes.upto)).events == []  # and once
        assert [e.seq async for e in other.events(EventQuery())] == [s1, s2]
        assert (await other.roll_up({}, 100)).processed == 2
        assert (await other.roll_up({}, 100)).processed == 0
        assert await other.rollup_lag() == 0
        # A node's own events are not in its feed.
        await other.write(_claims(["mine"]))
        assert [e.client_uuid for e in (await other.changes_since(changes.upto)).events] == []
        assert [e.client_uuid for e in (await store.changes_since(changes.upto)).events] == ["mine"]
    finally:
        await store.close()
        await other.close()
        await conn.close()


async def test_a_log_restored_onto_another_server_is_read_on(pg_server) -> None:  # noqa: ANN001
    """README's backup and restore (pg_dump, pg_restore) onto a server whose transaction ids are far lower than
    the old one's: the log's numbers are moved below the new server's at the first start, and the rollups,
    the export and the archive's bound read on - the restored events once, the new ones after them."""
    from tests import pg

    url, conn = await _database(pg_server)
    # The old server has handed out many more transaction ids than the fresh one will have.
    await conn.execute("CREATE TEMP TABLE burn (x int)")
    await conn.execute("DO $$ BEGIN FOR i IN 1..3000 LOOP BEGIN INSERT INTO burn VALUES (i);"
                       " EXCEPTION WHEN others THEN NULL; END; END LOOP; END $$")
    old = PostgresStore(url)
    await old.open()
    try:
        await old.write(_claims([f"old{k}" for k in range(5)], leasable=False))
        assert (await old.roll_up({}, 100)).processed == 5
    finally:
        await old.close()
        await conn.close()
    dump = subprocess.run(pg._as_owner([str(pg_server.bin / "pg_dump"), "-Fc", "-h", "127.0.0.1", "-p",
                                           str(pg_server.port), "-U", "lts", url.rsplit("/", 1)[1]]),
                             check=True, capture_output=True).stdout
    other = pg.start()
    try:
        restored = await other.new_database()
        subprocess.run(pg._as_owner([str(other.bin / "pg_restore"), "-h", "127.0.0.1", "-p", str(other.port),
                                        "-U", "lts", "-d", restored.rsplit("/", 1)[1]]), check=True, input=dump)
        conn = await asyncpg.connect(restored)
        assert await conn.fetchval("SELECT MAX(tx) FROM events") > await conn.fetchval(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")  # what the restore left
        store = PostgresStore(restored)
        await store.open()
        try:
            assert await conn.fetchval("SELECT MAX(tx) FROM events") < 0  # moved below the new server's
            await store.write(_claims([f"new{k}" for k in range(5)], leasable=False))
            assert (await store.roll_up({}, 100)).processed == 5  # the new ones, the old ones not again
            assert len([e async for e in store.events(EventQuery())]) == 10
            assert (await store.roll_up({}, 100)).processed == 0
        finally:
            await store.close()
        # A second start finds nothing to move.
        before = await conn.fetch("SELECT seq, tx FROM events ORDER BY seq")
        store = PostgresStore(restored)
        await store.open()
        await store.close()
        assert await conn.fetch("SELECT seq, tx FROM events ORDER BY seq") == before
        await conn.close()
    finally:
        other.stop()
