"""A value the database refuses fails the job that brought it, alone: its neighbours are written anyway.

The store names the job (store.Unstorable, like Conflict); the ledger fails that job with 400 and
writes the batch again without it. The text checks at the HTTP edge refuse what no database can store
(tests/test_hostile_corpus.py); what reaches a database that still refuses it (here a PostgreSQL
database in LATIN1, which cannot hold Chinese text) costs only its own request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from lts_server.store import Event, Store, Unstorable, WriteBatch
from lts_server.web.errors import UNSTORABLE
from tests.conftest import HELD_SEATS, Vendor, item, license_spec, query
from tests.test_postgres import start_node, stop_node

NewStore = Callable[[], Awaitable[Store]]
AT = datetime(2026, 1, 1, tzinfo=UTC)


def _batch(products: list[str]) -> WriteBatch:
    batch = WriteBatch(at=AT)
    for job, product in enumerate(products):
        batch.begin_job(job)
        batch.events.append(Event(at=AT, type="handshake", code="c", client_uuid=f"d{job}", product=product,
                                  deployment_type="browser", result=106))
    return batch


async def test_the_store_names_the_job_whose_row_it_cannot_store_and_writes_nothing(new_store: NewStore) -> None:
    store = await new_store()
    await store.open()
    try:
        # A lone surrogate is not text: neither SQLite (through sqlite3) nor PostgreSQL (through asyncpg) takes it.
        batch = _batch(["p0", "p1", "bad\ud800", "p3"])
        with pytest.raises(Unstorable) as refused:
            await store.write(batch)
        assert refused.value.job == 2
        assert await query(store, "SELECT COUNT(*) FROM events") == [(0,)]  # the probe left nothing behind
        await store.write(_batch(["p0", "p1", "p3"]))
        assert sorted(r[0] for r in await query(store, "SELECT product FROM events")) == ["p0", "p1", "p3"]
    finally:
        await store.close()


def test_a_batch_is_cut_into_the_rows_each_job_added() -> None:
    batch = WriteBatch(at=AT)
    batch.events.append(Event(at=AT, type="before-any-job"))
    batch.begin_job(0)
    batch.events.append(Event(at=AT, type="a"))
    batch.unit_charges["i"] = 3
    batch.begin_job(1)  # a job that added nothing
    batch.begin_job(2)
    batch.events.append(Event(at=AT, type="c"))
    parts = batch.parts()
    assert [(job, [e.type for e in part.events], part.unit_charges) for job, part in parts] == [
        (0, ["a"], {}), (2, ["c"], {}), (None, ["before-any-job"], {"i": 3})]


async def _latin1_database(pg_server: Any) -> str:
    url = await pg_server.new_database()
    name = url.rsplit("/", 1)[1] + "_latin1"
    conn = await asyncpg.connect(pg_server.url())
    try:
        await conn.execute(f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
                           " TEMPLATE template0")
    finally:
        await conn.close()
    return pg_server.url(name)


async def test_text_the_database_cannot_hold_fails_its_request_alone(tmp_path: Path, vendor: Vendor,
                                                                     pg_server: Any) -> None:
    url = await _latin1_database(pg_server)
    (tmp_path / "n" / "import").mkdir(parents=True)
    (tmp_path / "n" / "import" / "u.lic").write_bytes(vendor.issue(license_spec("U", items=[
        item("u1", quantity=10_000)])))
    node = await start_node(tmp_path / "n", vendor, url)
    try:
        async def ask(client: str, product: str) -> tuple[int, dict[str, Any]]:
            body = {"handshakeCode": "216998-U", "clientUuid": client, "product": product,
                    "deploymentType": "browser"}
            async with node.session.post(f"{node.url}/api/v1/handshake", json=body) as resp:
                return resp.status, await resp.json()

        # Asked together, so that the hostile requests share batches (and pipelined commits) with the others.
        rounds = []
        for n in range(5):
            rounds += [ask(f"good-{n}-{k}", "barcode-reader") for k in range(40)]
            rounds += [ask(f"bad-{n}-{k}", "条码读取器") for k in range(4)]
        answers = await asyncio.gather(*rounds)
        good = [a for a, call in zip(answers, range(len(answers))) if call % 44 < 40]
        bad = [a for a, call in zip(answers, range(len(answers))) if call % 44 >= 40]
        assert [s for s, _ in good] == [200] * 200, [a for a in good if a[0] != 200][:3]
        assert all(s == 400 and b["error"]["message"] == UNSTORABLE for s, b in bad), bad[:3]
        conn = await asyncpg.connect(url)
        try:
            seats = await conn.fetchval("SELECT COUNT(*) FROM seats")
            events = await conn.fetchval("SELECT COUNT(*) FROM events WHERE type = 'handshake'")
            used = await conn.fetchval(f"SELECT {HELD_SEATS} FROM items WHERE item_id = 'u1'")
        finally:
            await conn.close()
        assert (seats, events, used) == (200, 200, 200)  # every good request recorded, nothing of the bad
        assert (await ask("after", "barcode-reader"))[0] == 200
    finally:
        await stop_node(node)
