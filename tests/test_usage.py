"""Usage reports, counting, the event log and statistics."""

from __future__ import annotations

import asyncio
import base64
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lts_client import MAC_HEADER, report_mac
from lts_server.core.codes import CodeFields
from lts_server.core.times import iso, slice_start, to_ms
from lts_server.core.usage import SIZES, bucket_start
from lts_server.store import Event, Store, WriteBatch
from lts_server.store.postgres import PostgresStore
from tests.conftest import Running, item, license_spec, query
from tests.pg import PgServer

NewStore = Callable[[], Awaitable[Store]]


def slot(running: Running, minutes_ago: int = 0) -> str:
    return iso(slice_start(running.clock() - timedelta(minutes=minutes_ago)))


async def report(running: Running, report_id: str, records: list[dict], client: str = "device-1",
                 code: str = "216998-U") -> tuple[int, dict]:
    return await running.report({"reportId": report_id, "clientUuid": client, "handshakeCode": code,
                                 "records": records})


def rec(running: Running, count: int = 1, minutes_ago: int = 0, **kw) -> dict:
    return {"slot": slot(running, minutes_ago), "product": "barcode-reader", "operation": "scan", "count": count, **kw}


async def grant(running: Running, client: str = "device-1", **kw) -> dict:
    body = {"handshakeCode": "216998-U", "clientUuid": client, "product": "barcode-reader",
            "deploymentType": "browser", **kw}
    status, answer = await running.handshake(**body)
    assert status == 200, answer
    return answer["authorization"]


@pytest.fixture
async def unit(running: Running) -> Running:
    await running.drop("u.lic", running.vendor.issue(license_spec("U", items=[item("scan", "per-scan", quantity=100)])))
    await grant(running)
    return running


async def test_a_quota_of_five_billion_units_imports_and_counts_on_every_backend(running: Running) -> None:
    # PostgreSQL's items.quantity was an INTEGER: the file was refused as a value it cannot store.
    await running.drop("u.lic", running.vendor.issue(license_spec("U", items=[
        item("scan", "per-scan", quantity=5_000_000_000)])))
    assert running.ledger.open_rejections() == []
    await grant(running)
    assert (await report(running, "r-big", [rec(running, 7)]))[0] == 200
    assert await running.sql_value("SELECT quantity - units_used FROM items WHERE item_id = 'scan'") == 4_999_999_993


async def test_report_counts_units_once_by_report_id(unit: Running) -> None:
    for _ in range(3):
        status, body = await report(unit, "r-1", [rec(unit, 7), rec(unit, 3, minutes_ago=3)])
        assert status == 200
    assert body == {"reportId": "r-1", "duplicate": True, "accepted": 0}
    assert unit.ledger.statuses["scan"].units_used == 10
    assert await unit.sql_value("SELECT units_used FROM items WHERE item_id = 'scan'") == 10
    assert await unit.sql_value("SELECT COUNT(*) FROM events WHERE type = 'usage.report'") == 1


async def test_the_same_report_concurrently_counts_once(unit: Running) -> None:
    results = await asyncio.gather(*(report(unit, "r-c", [rec(unit, 5)]) for _ in range(3)))
    assert sorted(body["duplicate"] for _, body in results) == [False, True, True]
    assert unit.ledger.statuses["scan"].units_used == 5


async def test_duplicates_are_found_after_a_restart(unit: Running) -> None:
    assert (await report(unit, "r-old", [rec(unit, 5)]))[1]["duplicate"] is False
    unit.ledger._recent_reports.clear()  # as after a restart: only the database remembers
    assert (await report(unit, "r-old", [rec(unit, 5)]))[1]["duplicate"] is True
    assert unit.ledger.statuses["scan"].units_used == 5


@pytest.mark.parametrize("record, needle", [
    ({"slot": "LATE"}, "more than 30 days old"),
    ({"slot": "MISALIGNED"}, "start of a 3-minute slice"),
    ({"slot": "FUTURE"}, "future beyond 5 minutes"),
    ({"count": -1}, "records[0].count"),
    ({"count": 10**9}, "records[0].count"),
    ({"operation": ""}, "records[0].operation"),
])
async def test_bad_records_get_400_naming_the_problem(unit: Running, record: dict, needle: str) -> None:
    now = unit.clock()
    slots = {"LATE": iso(slice_start(now - timedelta(days=31))),
             "MISALIGNED": iso(slice_start(now) + timedelta(minutes=1)),
             "FUTURE": iso(slice_start(now + timedelta(minutes=9)))}
    r = {**rec(unit), **record}
    r["slot"] = slots.get(r["slot"], r["slot"])
    status, body = await report(unit, "bad", [r])
    assert status == 400 and needle in body["error"]["message"], body
    assert unit.ledger.statuses["scan"].units_used == 0


async def test_late_reports_within_30_days_and_small_skew_are_accepted(unit: Running) -> None:
    status, _ = await report(unit, "late", [rec(unit, 2, minutes_ago=29 * 24 * 60)])
    assert status == 200
    future = {**rec(unit, 1), "slot": iso(slice_start(unit.clock() + timedelta(minutes=3)))}
    assert (await report(unit, "skew", [future]))[0] == 200
    assert unit.ledger.statuses["scan"].units_used == 3


async def test_too_many_records(unit: Running) -> None:
    status, body = await report(unit, "big", [rec(unit)] * 1001)
    assert status == 400 and body["error"]["field"] == "records"


async def test_device_without_authorization_gets_403(unit: Running) -> None:
    status, body = await report(unit, "x", [rec(unit)], client="stranger")
    assert status == 403 and body["error"]["code"] == 104
    status, body = await report(unit, "y", [rec(unit)], code="216998-nope")
    assert status == 403 and body["error"]["code"] == 101


async def test_per_scan_exhaustion_with_grace(unit: Running) -> None:
    assert (await report(unit, "a", [rec(unit, 104)]))[0] == 200
    assert (await unit.handshake(handshakeCode="216998-U", clientUuid="device-2"))[0] == 200  # 104 < 105
    assert (await report(unit, "b", [rec(unit, 1)]))[0] == 200
    status, body = await unit.handshake(handshakeCode="216998-U", clientUuid="device-3")
    assert status == 403 and body["error"]["code"] == 120
    # Usage never disappears: reports past the limit are still recorded.
    assert (await report(unit, "c", [rec(unit, 50)]))[0] == 200
    assert unit.ledger.statuses["scan"].units_used == 155


async def test_report_refreshes_a_device_seat(running: Running) -> None:
    await running.drop("d.lic", running.vendor.issue(license_spec("D", items=[item("d", period="daily")])))
    await running.handshake(handshakeCode="216998-D")
    first = (await running.ledger.device("device-1")).seats["d"].expires_at
    running.clock.advance(hours=5)
    status, _ = await report(running, "r", [rec(running)], code="216998-D")
    assert status == 200
    assert (await running.ledger.device("device-1")).seats["d"].expires_at == first + timedelta(hours=5)


async def test_concurrency_counted_per_slice_and_device(running: Running) -> None:
    await running.drop("c.lic", running.vendor.issue(license_spec("C", items=[
        item("conc", "per-concurrent-device", quantity=2)])))
    for d in ("a", "b", "c"):
        await running.handshake(handshakeCode="216998-C", clientUuid=d)
    await report(running, "a1", [rec(running), rec(running, minutes_ago=3)], client="a", code="216998-C")
    await report(running, "a2", [rec(running)], client="a", code="216998-C")  # same slice again: once
    await report(running, "b1", [rec(running)], client="b", code="216998-C")
    await report(running, "c1", [rec(running)], client="c", code="216998-C")
    await running.server.roll_up()
    now_slot = to_ms(slice_start(running.clock()))
    rows = dict(await running.sql(
        "SELECT bucket_ms, devices FROM rollups WHERE scope = 'item' AND key = 'conc' AND size = '3m'"))
    assert rows[now_slot] == 3 and rows[now_slot - 180_000] == 1


async def test_instance_overuse_tolerance_then_only_n_instances(running: Running) -> None:
    await running.drop("i.lic", running.vendor.issue(license_spec("I", items=[
        item("inst", "per-concurrent-instance", quantity=1)])))
    for server in ("s1", "s2"):
        status, _ = await running.handshake(handshakeCode="216998-I", clientUuid=server, deploymentType="server")
        assert status == 200
    # Two servers x 1 instance on a quantity of 1: one instance-slice beyond N per slice.
    for server in ("s1", "s2"):
        records = [rec(running, minutes_ago=3 * k) for k in range(600)]
        assert (await report(running, f"{server}-a", records, client=server, code="216998-I"))[0] == 200
    await running.server.roll_up()
    status = running.ledger.statuses["inst"]
    assert status.overuse_used == 600 and not status.overused
    for server in ("s1", "s2"):
        records = [rec(running, minutes_ago=3 * k) for k in range(600, 1000)]
        await report(running, f"{server}-b", records, client=server, code="216998-I")
    await running.server.roll_up()
    status = running.ledger.statuses["inst"]
    assert status.overuse_used == 1000 and status.overused  # 1000 x N used up
    code, body = await running.handshake(handshakeCode="216998-I", clientUuid="s3", deploymentType="server")
    assert code == 403 and body["error"]["code"] == 120
    assert await running.sql_value("SELECT overused FROM items WHERE item_id = 'inst'") == 1


async def test_statistics_do_not_change_when_items_leave_a_code(running: Running) -> None:
    await running.drop("s.lic", running.vendor.issue(license_spec("S", items=[item("s1"), item("s2")])))
    for n in range(3):
        await running.handshake(handshakeCode="216998-S", clientUuid=f"d{n}")
    await running.handshake(handshakeCode="216998-S", product="nothing")
    await running.server.roll_up()

    async def stats() -> dict:
        async with running.session.get(f"{running.url}/api/v1/admin/stats/codes/216998-S?bucket=1d") as resp:
            assert resp.status == 200
            return await resp.json()

    before = await stats()
    assert before["summary"]["all"] == {"granted": 3, "refused": 1, "units": 0, "devices": 3}
    await running.ledger.edit_code("216998-S", CodeFields(items=("s2",)))
    await running.server.roll_up()
    after = await stats()
    assert after["summary"] == before["summary"] and after["series"] == before["series"]
    assert [i["itemId"] for i in after["items"]] == ["s2"]


async def test_item_stats_and_status(unit: Running) -> None:
    await report(unit, "r", [rec(unit, 40)])
    await unit.server.roll_up()
    async with unit.session.get(f"{unit.url}/api/v1/admin/stats/items/scan?bucket=2h") as resp:
        body = await resp.json()
    assert body["status"]["units"] == {"used": 40, "quantity": 100, "limit": 105}
    assert body["status"]["daysToExpiry"] >= 364
    assert body["summary"]["today"]["units"] == 40 and body["summary"]["today"]["granted"] == 1
    assert sum(b["units"] for b in body["series"]) == 40
    async with unit.session.get(f"{unit.url}/api/v1/admin/stats/items/scan?bucket=weekly") as resp:
        assert resp.status == 400 and (await resp.json())["error"]["field"] == "bucket"
    async with unit.session.get(f"{unit.url}/api/v1/admin/stats/items/nope") as resp:
        assert resp.status == 404


async def test_event_export_ndjson_and_csv(unit: Running) -> None:
    await report(unit, "r", [rec(unit, 4)])
    async with unit.session.get(f"{unit.url}/api/v1/admin/events?type=usage.record") as resp:
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert [(e["type"], e["itemId"], e["units"]) for e in lines] == [("usage.record", "scan", 4)]
    async with unit.session.get(f"{unit.url}/api/v1/admin/events?code=216998-U",
                                headers={"Accept": "text/csv"}) as resp:
        text = await resp.text()
    rows = text.strip().splitlines()
    assert rows[0].startswith("seq,at,type,code")
    assert any(",handshake,216998-U," in r for r in rows[1:])


# -- rollups always equal a brute-force recount of the raw events ------------------

BASE = datetime(2026, 3, 1, tzinfo=UTC)

event_strategy = st.builds(
    lambda minutes, kind, code, item_id, client, units: Event(
        at=BASE + timedelta(minutes=minutes), type=kind, code=code, item_id=item_id, client_uuid=client,
        result=(0 if kind == "handshake" and units % 2 == 0 else (120 if kind == "handshake" else None)),
        units=units if kind == "usage.record" else None),
    minutes=st.integers(0, 3 * 24 * 60),
    kind=st.sampled_from(["handshake", "usage.record", "seat.granted"]),
    code=st.sampled_from(["216998-a", "216998-b", None]),
    item_id=st.sampled_from(["i1", "i2", None]),
    client=st.sampled_from(["d1", "d2", "d3", "d4"]),
    units=st.integers(0, 50),
)


def brute_force(events: list[Event]) -> dict[tuple, tuple[int, int, int, int]]:
    granted: dict[tuple, int] = defaultdict(int)
    refused: dict[tuple, int] = defaultdict(int)
    units: dict[tuple, int] = defaultdict(int)
    devices: dict[tuple, set] = defaultdict(set)
    for e in events:
        if e.type not in ("handshake", "usage.record"):
            continue
        for scope, key in (("code", e.code), ("item", e.item_id)):
            if key is None:
                continue
            for size in SIZES:
                k = (scope, key, size, bucket_start(to_ms(e.at), size))
                if e.type == "handshake":
                    if e.result == 0:
                        granted[k] += 1
                        devices[k].add(e.client_uuid)
                    else:
                        refused[k] += 1
                else:
                    units[k] += e.units or 0
                    devices[k].add(e.client_uuid)
    keys = set(granted) | set(refused) | set(units) | set(devices)
    return {k: (granted[k], refused[k], units[k], len(devices[k])) for k in keys}


ROLLUP_COLUMNS = "SELECT scope, key, size, bucket_ms, granted, refused, units, devices FROM rollups"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(event_strategy, max_size=30), min_size=1, max_size=6),
       page=st.integers(1, 40))
def test_rollups_equal_a_recount_of_raw_events(new_store: NewStore, batches: list[list[Event]], page: int) -> None:
    async def run() -> None:
        store = await new_store()
        await store.open()
        try:
            for batch in batches:
                await store.write(WriteBatch(events=batch, at=BASE))
                while (await store.roll_up({}, page)).processed == page:
                    pass
            rows = await query(store, ROLLUP_COLUMNS)
        finally:
            await store.close()
        got = {tuple(r[:4]): tuple(r[4:]) for r in rows if any(r[4:])}
        expected = {k: v for k, v in brute_force([e for b in batches for e in b]).items() if any(v)}
        assert got == expected

    asyncio.run(run())


async def test_instances_count_when_handshake_and_report_fall_in_different_pages(new_store: NewStore) -> None:
    store = await new_store()
    await store.open()
    try:
        slot_at = BASE
        await store.write(WriteBatch(events=[
            Event(at=slot_at, type="handshake", code="c", item_id="inst", client_uuid="s1", result=0),
            Event(at=slot_at, type="handshake", code="c", item_id="inst", client_uuid="s2", result=0),
            Event(at=slot_at, type="usage.record", code="c", item_id="inst", client_uuid="s1", units=1, instances=3),
            Event(at=slot_at, type="usage.record", code="c", item_id="inst", client_uuid="s2", units=1, instances=2),
        ], at=BASE))
        quantities = {"inst": ("per-concurrent-instance", 4)}
        overuse = 0
        while (result := await store.roll_up(quantities, 1)).processed:
            overuse += sum(result.overuse.values())
        rows = await store.rollup_series("item", "inst", "3m", 0, to_ms(BASE) + 1)
        assert (rows[0].devices, rows[0].instances) == (2, 5)
        assert overuse == 1  # 5 instances in the slice on a quantity of 4
    finally:
        await store.close()


async def test_device_marks_are_pruned_after_the_lateness_window_and_totals_stay(unit: Running) -> None:
    await report(unit, "r", [rec(unit, 2)])
    await unit.server.roll_up()
    assert await unit.sql_value("SELECT COUNT(*) FROM rollup_days") == 1  # one row: the device's day
    assert await unit.server.prune_rollups() == (0, 0)  # nothing is old yet
    unit.clock.advance(days=32)
    assert await unit.server.prune_rollups() == (1, 0)
    assert await unit.sql_value("SELECT COUNT(*) FROM rollup_days") == 0
    assert await unit.sql_value("SELECT COUNT(*) FROM rollup_clients") == 1  # the all-time marks stay
    totals = await unit.sql_value("SELECT SUM(units) FROM rollups WHERE scope = 'item' AND size = '3m'")
    assert totals == 2


# -- concurrent-device overuse ---------------------------------------------------------------


async def test_concurrent_device_overuse_is_counted_and_shown(running: Running) -> None:
    await running.drop("c.lic", running.vendor.issue(license_spec("C", items=[
        item("conc", "per-concurrent-device", quantity=2)])))
    for d in ("a", "b", "c"):
        assert (await running.handshake(handshakeCode="216998-C", clientUuid=d))[0] == 200
        assert (await report(running, f"{d}-1", [rec(running, minutes_ago=30)], client=d, code="216998-C"))[0] == 200
    await running.server.roll_up()
    # Now: 3 devices active (their handshakes) on 2; 30 minutes ago: 3 devices reporting on 2.
    async with running.session.get(f"{running.url}/api/v1/admin/stats/items/conc?bucket=2h") as resp:
        body = await resp.json()
    assert body["status"]["overuse"]["used"] == 2 and body["status"]["overuse"]["tolerance"] == 2000
    async with running.session.get(f"{running.url}/api/v1/admin/items") as resp:
        listed = {i["itemId"]: i for i in (await resp.json())["items"]}
    assert listed["conc"]["overuse"]["used"] == 2
    assert await running.sql_value("SELECT overuse_used FROM items WHERE item_id = 'conc'") == 2


async def test_concurrent_device_tolerance_then_only_n_devices(running: Running) -> None:
    await running.drop("c.lic", running.vendor.issue(license_spec("C", items=[
        item("conc", "per-concurrent-device", quantity=1)])))
    for d in ("a", "b"):
        assert (await running.handshake(handshakeCode="216998-C", clientUuid=d))[0] == 200
    # Two devices on a quantity of 1 in 1000 slices (the handshake's own slice included): 1000 exceptions.
    for d in ("a", "b"):
        for part in range(2):
            records = [rec(running, minutes_ago=3 * k) for k in range(1 + 500 * part, min(1000, 501 + 500 * part))]
            assert (await report(running, f"{d}-{part}", records, client=d, code="216998-C"))[0] == 200
    await running.server.roll_up()
    status = running.ledger.statuses["conc"]
    assert status.overuse_used == 1000 and status.overused
    code, body = await running.handshake(handshakeCode="216998-C", clientUuid="c")
    assert code == 403 and body["error"]["code"] == 120 and "devices" in body["error"]["message"]


concurrency_event = st.builds(
    lambda client, slot_no, kind: Event(
        at=BASE + timedelta(minutes=3 * slot_no), type=kind, code="216998-c", item_id="conc", client_uuid=client,
        result=0 if kind == "handshake" else None, units=1 if kind == "usage.record" else None),
    client=st.sampled_from(["d1", "d2", "d3", "d4", "d5"]),
    slot_no=st.integers(0, 5),
    kind=st.sampled_from(["handshake", "usage.record"]),
)


def overuse_recount(events: list[Event], quantity: int) -> int:
    """Device-slices beyond `quantity` on the concurrent item: the devices active in each slice, counted anew."""
    active: dict[datetime, set[str]] = defaultdict(set)
    for e in events:
        if e.item_id == "conc":
            active[e.at].add(e.client_uuid)
    return sum(max(0, len(devices) - quantity) for devices in active.values())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(concurrency_event, max_size=25), min_size=1, max_size=5),
       page=st.integers(1, 30), quantity=st.integers(1, 4))
def test_concurrent_device_overuse_equals_a_recount(new_store: NewStore, batches: list[list[Event]], page: int,
                                                    quantity: int) -> None:
    async def run() -> int:
        store = await new_store()
        await store.open()
        try:
            total = 0
            for batch in batches:
                await store.write(WriteBatch(events=batch, at=BASE))
                while True:
                    result = await store.roll_up({"conc": ("per-concurrent-device", quantity)}, page)
                    total += sum(result.overuse.values())
                    if result.processed < page:
                        break
            return total
        finally:
            await store.close()

    assert asyncio.run(run()) == overuse_recount([e for b in batches for e in b], quantity)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.tuples(st.integers(0, 1), st.lists(event_strategy | concurrency_event, max_size=20)),
                        min_size=1, max_size=8),
       page=st.integers(1, 30), quantity=st.integers(1, 4))
def test_two_nodes_on_one_database_count_rollups_and_overuse_once(
        pg_server: PgServer, batches: list[tuple[int, list[Event]]], page: int, quantity: int) -> None:
    """Two nodes write events and roll up at the same time: every event is folded exactly once."""
    quantities = {"conc": ("per-concurrent-device", quantity)}

    async def node(store: PostgresStore, me: int) -> int:
        overuse = 0
        for writer, batch in batches:
            if writer == me:
                await store.write(WriteBatch(events=batch, at=BASE))
            result = await store.roll_up(quantities, page)  # the other node may be writing meanwhile
            overuse += sum(result.overuse.values())
        while (result := await store.roll_up(quantities, page)).processed:
            overuse += sum(result.overuse.values())
        return overuse

    async def run() -> tuple[int, list[tuple]]:
        url = await pg_server.new_database()
        nodes = [PostgresStore(url), PostgresStore(url)]
        await asyncio.gather(*(n.open() for n in nodes))
        try:
            overuse = sum(await asyncio.gather(node(nodes[0], 0), node(nodes[1], 1)))
            return overuse, await query(nodes[0], ROLLUP_COLUMNS)
        finally:
            await asyncio.gather(*(n.close() for n in nodes))

    overuse, rows = asyncio.run(run())
    events = [e for _, batch in batches for e in batch]
    got = {tuple(r[:4]): tuple(r[4:]) for r in rows if any(r[4:])}
    assert got == {k: v for k, v in brute_force(events).items() if any(v)}
    assert overuse == overuse_recount(events, quantity)


# -- usage reports bound to their device --------------------------------------------------------


async def test_reports_need_the_mac_of_the_devices_own_report_key(unit: Running) -> None:
    await grant(unit, client="device-2")
    body = {"reportId": "forged", "clientUuid": "device-2", "handshakeCode": "216998-U", "records": [rec(unit, 50)]}
    data = json.dumps(body).encode()
    key_1 = base64.b64decode(unit.report_keys[("216998-U", "device-1")])
    attempts = [
        (None, 401),  # no MAC at all
        ("bm90IGEgbWFj", 403),  # a made-up one
        (report_mac(key_1, data), 403),  # device-1's key, for device-2's report
    ]
    for mac, expected in attempts:
        headers = {"Content-Type": "application/json", **({MAC_HEADER: mac} if mac else {})}
        async with unit.session.post(f"{unit.url}/api/v1/usage", data=data, headers=headers) as resp:
            answer = await resp.json()
            assert resp.status == expected, answer
            assert MAC_HEADER in answer["error"]["message"]
    assert unit.ledger.statuses["scan"].units_used == 0
    assert await unit.sql_value("SELECT COUNT(*) FROM usage_reports") == 0
    # The device's own key, over the same bytes: counted (the forged attempts did not burn the report id).
    status, answer = await unit.report(body)
    assert status == 200 and answer["accepted"] == 1
    assert unit.ledger.statuses["scan"].units_used == 50


async def test_a_new_handshake_replaces_the_report_key(unit: Running) -> None:
    old_key = unit.report_keys[("216998-U", "device-1")]
    unit.clock.advance(seconds=1)
    await grant(unit)
    assert unit.report_keys[("216998-U", "device-1")] != old_key
    body = {"reportId": "late", "clientUuid": "device-1", "handshakeCode": "216998-U", "records": [rec(unit)]}
    assert (await unit.report(body, mac=report_mac(base64.b64decode(old_key), json.dumps(body).encode())))[0] == 403
    assert (await unit.report(body))[0] == 200
