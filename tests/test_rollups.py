"""The bounded rollups (issue 23): the statistics equal those of the shape before over the same events,
a database the release before made is converted in place (resumable), the retention tiers, the stored
form of the device marks."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import shutil
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lts_server import config as config_mod
from lts_server import migrate as migrate_mod
from lts_server.core.marks import KeyDay, decode_client, decode_day, encode_client, encode_day
from lts_server.core.times import from_ms, iso, parse_iso, slice_start, to_ms
from lts_server.core.usage import DAY_MS, MONTH, SLICES_PER_HOUR, bucket_start, month_index
from lts_server.server import Server
from lts_server.store import Event, RollupResult, Store, WriteBatch
from lts_server.store import sql as sql_mod
from lts_server.store.postgres import PostgresStore
from lts_server.store.sqlite import SQLiteStore
from tests import legacy_rollups as legacy
from tests.conftest import ROOT, Clock, Running, admin_login, item, license_spec, query, write_config

NewStore = Callable[[], Awaitable[Store]]
BASE = datetime(2026, 3, 1, tzinfo=UTC)
OLD_SIZES = ("3m", "2h", "1d", "all")
COUNTER_COLUMNS = "SELECT scope, key, size, bucket_ms, granted, refused, units, devices, instances FROM rollups"
QUANTITIES = {"conc": ("per-concurrent-device", 2), "inst": ("per-concurrent-instance", 2)}
FIXTURE = ROOT / "tests" / "data" / "previous-release"


# -- the stored form of the marks --------------------------------------------------------------------------


@st.composite
def key_days(draw: st.DrawFn) -> KeyDay:
    slices = draw(st.sets(st.integers(0, 479), max_size=60))
    kd = KeyDay()
    for s in slices:
        kd.slices |= 1 << s
        kd.hours |= 1 << s // SLICES_PER_HOUR
    if slices and draw(st.booleans()):
        kd.instances = {s: draw(st.integers(1, 100_000)) for s in slices if draw(st.booleans())}
    return kd


@settings(max_examples=300)
@given(row=st.dictionaries(st.integers(1, 5000), key_days(), max_size=6), copies=st.lists(st.integers(1, 5000)))
def test_day_rows_read_back_as_written(row: dict[int, KeyDay], copies: list[int]) -> None:
    for kid in copies:  # a code and its item usually share the same body
        if row:
            source = row[min(row)]
            row[kid] = KeyDay(source.hours, source.slices, dict(source.instances))
    assert decode_day(encode_day(row)) == row


def test_a_device_active_hourly_takes_a_day_row_of_66_bytes() -> None:
    kd = KeyDay()
    for hour in range(24):
        s = hour * SLICES_PER_HOUR + 7
        kd.slices |= 1 << s
        kd.hours |= 1 << hour
    code_and_item = {1: kd, 2: KeyDay(kd.hours, kd.slices)}
    # The code's entry: its number, the hours, the slices up to the last (467: 59 bytes); the item's: "the same".
    assert len(encode_day(code_and_item)) == 1 + 3 + 1 + 59 + 1


@settings(max_examples=300)
@given(keys=st.dictionaries(st.integers(1, 100_000), st.tuples(
    st.integers(0, 2000), st.sets(st.integers(1, 2), max_size=2), st.booleans())))
def test_client_rows_read_back_as_written(keys: dict[int, tuple[int, set[int], bool]]) -> None:
    marks = {kid: (set() if empty else {latest} | {latest - d for d in back}) for kid, (latest, back, empty)
             in keys.items()}
    assert decode_client(encode_client(marks)) == marks


# -- the same statistics as the shape before ----------------------------------------------------------------

event = st.builds(
    lambda minutes, kind, code, item_id, client, units, instances: Event(
        at=BASE + timedelta(minutes=minutes), type=kind, code=code, item_id=item_id, client_uuid=client,
        result=(0 if kind == "handshake" and units % 3 else (120 if kind == "handshake" else None)),
        units=units if kind == "usage.record" else None,
        instances=instances if item_id == "inst" else None),
    # Most within the hour (so devices meet in a slice again), some anywhere in 40 days (across a month).
    minutes=st.one_of(st.integers(0, 60), st.integers(0, 40 * 24 * 60)),
    kind=st.sampled_from(["handshake", "usage.record", "seat.granted"]),
    code=st.sampled_from(["216998-a", "216998-b", None]),
    item_id=st.sampled_from(["dev", "conc", "inst", None]),
    client=st.sampled_from(["d1", "d2", "d3", "d4"]),
    units=st.integers(0, 50),
    instances=st.integers(0, 4),
)


def legacy_rows(events: list[Event]) -> tuple[Any, ...]:
    return tuple((to_ms(e.at), e.type, e.code, e.item_id, e.client_uuid, e.result, e.units, e.instances)
                 for e in events)


def counters(rows: list[tuple], sizes: tuple[str, ...] = OLD_SIZES) -> dict[tuple, tuple]:
    return {tuple(r[:4]): tuple(r[4:]) for r in rows if r[2] in sizes and any(r[4:])}


def month_devices(events: list[Event]) -> dict[tuple, int]:
    """Distinct devices active per code and item and calendar month, counted from the raw events."""
    active: dict[tuple, set[str]] = defaultdict(set)
    for e in events:
        if e.type == "usage.record" or (e.type == "handshake" and e.result == 0):
            for scope, key in (("code", e.code), ("item", e.item_id)):
                if key:
                    active[(scope, key, MONTH, bucket_start(to_ms(e.at), MONTH))].add(e.client_uuid)
    return {k: len(v) for k, v in active.items()}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(event, max_size=25), min_size=1, max_size=6), page=st.integers(1, 40))
def test_the_old_and_the_new_shape_give_the_same_statistics(new_store: NewStore, tmp_path_factory: pytest.TempPathFactory,
                                                            batches: list[list[Event]], page: int) -> None:
    """The same events in the same pages, folded by the release before (into its rollup_devices) and by this
    one: every counter of every bucket the statistics show, and the overuse, are the same."""
    old = tmp_path_factory.mktemp("old") / "db.sqlite3"
    legacy.create_sqlite(old)

    async def run() -> tuple[list[tuple], int, int]:
        store = await new_store()
        await store.open()
        old_overuse = new_overuse = 0
        try:
            for batch in batches:
                await store.write(WriteBatch(events=batch, at=BASE))
                legacy.run_sqlite(old, legacy.insert_events(list(legacy_rows(batch))))
                while True:
                    result = await store.roll_up(QUANTITIES, page)
                    before: RollupResult = legacy.run_sqlite(old, legacy.roll_up(QUANTITIES, page))  # type: ignore
                    assert (result.processed, result.last_seq > 0) == (before.processed, before.last_seq > 0)
                    new_overuse += sum(result.overuse.values())
                    old_overuse += sum(before.overuse.values())
                    if result.processed < page:
                        break
            return await query(store, COUNTER_COLUMNS), new_overuse, old_overuse
        finally:
            await store.close()

    rows, new_overuse, old_overuse = asyncio.run(run())
    old_rows = legacy.run_sqlite(old, iter_query(COUNTER_COLUMNS))
    assert counters(rows) == counters(old_rows)  # type: ignore[arg-type]
    assert new_overuse == old_overuse
    # The monthly buckets are new: their devices are distinct devices, their counts the daily ones summed.
    events = [e for b in batches for e in b]
    month = {k: v[3] for k, v in counters(rows, (MONTH,)).items() if v[3]}
    assert month == month_devices(events)
    daily: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
    for (scope, key, _, bucket), values in counters(rows, ("1d",)).items():
        for i in range(3):
            daily[(scope, key, MONTH, bucket_start(bucket, MONTH))][i] += values[i]
    assert {k: tuple(v[:3]) for k, v in counters(rows, (MONTH,)).items()} == {k: tuple(v) for k, v in daily.items()}


def iter_query(statement: str) -> sql_mod.Procedure[list[tuple]]:
    return (yield sql_mod.Query(statement))


# -- through HTTP -----------------------------------------------------------------------------------------------


async def traffic(running: Running, hours: int, start: datetime) -> None:
    """Devices on per-device, concurrent-device and concurrent-instance items, handshaking hourly and
    reporting usage (some a day late, some twice for one slice), with refusals."""
    clock = running.clock

    async def report(client: str, code: str, records: list[dict], rid: str) -> None:
        status, body = await running.report({"reportId": rid, "clientUuid": client, "handshakeCode": code,
                                             "records": records})
        assert status == 200, body

    def rec(minutes_ago: int = 0) -> dict:
        return {"slot": iso(slice_start(clock() - timedelta(minutes=minutes_ago))), "product": "barcode-reader",
                "operation": "scan", "count": 2}

    for hour in range(hours):
        for d in range(4):
            clock.now = start + timedelta(hours=hour, minutes=1 + 5 * d)
            assert (await running.handshake(handshakeCode="216998-D", clientUuid=f"dev-{d}"))[0] == 200
            if d == 0 and hour % 5 == 0:  # twice in one slice: counts once
                assert (await running.handshake(handshakeCode="216998-D", clientUuid="dev-0"))[0] == 200
        clock.now = start + timedelta(hours=hour, minutes=40)
        for d in range(3):
            assert (await running.handshake(handshakeCode="216998-C", clientUuid=f"conc-{d}"))[0] == 200
            late = [rec(24 * 60)] if hour >= 24 and d == 0 else []
            await report(f"conc-{d}", "216998-C", [rec(), rec(3), *late], f"c-{hour}-{d}")
        for d in range(2):
            assert (await running.handshake(handshakeCode="216998-I", clientUuid=f"srv-{d}",
                                            deploymentType="server", instances=2))[0] == 200
            await report(f"srv-{d}", "216998-I", [rec(), rec(6)], f"i-{hour}-{d}")
        if hour % 7 == 0:
            assert (await running.handshake(handshakeCode="216998-D", clientUuid="x", product="nothing"))[0] == 403


ITEMS = {"D": [item("dev", quantity=50)], "C": [item("conc", "per-concurrent-device", quantity=2)],
         "I": [item("inst", "per-concurrent-instance", quantity=2)]}


async def relogin(running: Running) -> None:
    """A new admin token: the test's clock moved past the first one's lifetime."""
    running.session.headers["Authorization"] = f"Bearer {await admin_login(running.url)}"


async def test_statistics_through_http_are_those_the_old_shape_gives(running: Running, tmp_path: Path) -> None:
    since = {"starts_at": running.clock() - timedelta(days=10)}
    for name, items in ITEMS.items():
        await running.drop(f"{name}.lic", running.vendor.issue(license_spec(name, items=[{**i, **since}
                                                                                        for i in items])))
    start = running.clock().replace(minute=0, second=0, microsecond=0) - timedelta(hours=50)
    # The traffic is replayed from 50 hours back: the admin accepts the clock set back (else 160).
    running.clock.now = start
    async with running.session.post(f"{running.url}/api/v1/admin/clock/accept") as resp:
        assert resp.status == 200, await resp.text()
    await traffic(running, 50, start)
    running.clock.now = start + timedelta(hours=50, minutes=2)
    await running.server.roll_up()
    await relogin(running)
    # The event log as the export gives it, folded by the release before.
    async with running.session.get(f"{running.url}/api/v1/admin/events") as resp:
        exported = [json.loads(line) for line in (await resp.text()).splitlines()]
    old = tmp_path / "old.sqlite3"
    legacy.create_sqlite(old)
    legacy.run_sqlite(old, legacy.insert_events([
        (to_ms(parse_iso(e["at"])), e["type"], e["code"], e["itemId"], e["clientUuid"], e["result"], e["units"],
         e["instances"]) for e in exported]))
    old_overuse: dict[str, int] = defaultdict(int)
    while (result := legacy.run_sqlite(old, legacy.roll_up(QUANTITIES, 97))).processed:  # type: ignore[union-attr]
        for k, v in result.overuse.items():  # type: ignore[union-attr]
            old_overuse[k] += v
    old_rows = counters(legacy.run_sqlite(old, iter_query(COUNTER_COLUMNS)))  # type: ignore[arg-type]
    first_day = start.replace(hour=0)
    now = running.clock()
    ranges = [("3m", first_day + timedelta(days=d), first_day + timedelta(days=d + 1)) for d in range(3)]
    ranges += [("2h", start, now), ("1d", first_day, now)]
    checked = 0
    for scope, path, key in [("code", "codes", f"216998-{n}") for n in ITEMS] + [("item", "items", k)
                                                                               for k in ("dev", "conc", "inst")]:
        for bucket, frm, to in ranges:
            async with running.session.get(f"{running.url}/api/v1/admin/stats/{path}/{key}",
                                           params={"bucket": bucket, "from": iso(frm), "to": iso(to)}) as resp:
                body = await resp.json()
                assert resp.status == 200, body
            for b in body["series"]:
                values = old_rows.get((scope, key, bucket, to_ms(parse_iso(b["start"]))), (0, 0, 0, 0, 0))
                assert (b["granted"], b["refused"], b["units"], b["devices"]) == values[:4], (key, bucket, b)
                checked += any(values)
            period = [old_rows.get((scope, key, bucket, to_ms(parse_iso(b["start"]))), (0,) * 5)
                      for b in body["series"]]
            assert body["summary"]["period"] == {"granted": sum(v[0] for v in period),
                                                 "refused": sum(v[1] for v in period),
                                                 "units": sum(v[2] for v in period),
                                                 "peakDevices": max(v[3] for v in period)}
            total = old_rows[(scope, key, "all", 0)]
            assert body["summary"]["all"] == dict(zip(("granted", "refused", "units", "devices"), total[:4]))
            today = old_rows.get((scope, key, "1d", bucket_start(to_ms(now), "1d")), (0,) * 5)
            assert body["summary"]["today"] == dict(zip(("granted", "refused", "units", "devices"), today[:4]))
    assert checked > 300  # buckets with something in them
    async with running.session.get(f"{running.url}/api/v1/admin/items") as resp:
        listed = {i["itemId"]: i for i in (await resp.json())["items"]}
    assert {k: listed[k]["overuse"]["used"] for k in ("conc", "inst")} == dict(old_overuse)
    assert all(old_overuse.values())


async def test_monthly_buckets_and_retention_through_http(running: Running) -> None:
    await running.drop("D.lic", running.vendor.issue(license_spec("D", items=[item("dev", quantity=50)])))
    for d in range(3):
        assert (await running.handshake(handshakeCode="216998-D", clientUuid=f"dev-{d}"))[0] == 200
    running.clock.advance(days=1)
    assert (await running.handshake(handshakeCode="216998-D", clientUuid="dev-0"))[0] == 200
    await running.server.roll_up()
    await relogin(running)
    now = running.clock()
    frm = iso(now - timedelta(days=400))
    async with running.session.get(f"{running.url}/api/v1/admin/stats/codes/216998-D",
                                   params={"bucket": "1mo", "from": frm}) as resp:
        body = await resp.json()
    assert resp.status == 200, body
    assert body["retainedFrom"] is None  # months are kept for good
    this_month = [b for b in body["series"] if b["granted"]]
    assert len(body["series"]) in (14, 15) and body["series"][0]["start"].endswith("-01T00:00:00Z")
    days = {now.month, (now - timedelta(days=1)).month}
    assert sum(b["granted"] for b in this_month) == 4 and sum(b["devices"] for b in this_month) == 3 + len(days) - 1
    async with running.session.get(f"{running.url}/api/v1/admin/stats/codes/216998-D?bucket=3m") as resp:
        body = await resp.json()
    # 3-minute buckets are kept [stats] hourly_days (90 by default).
    assert parse_iso(body["retainedFrom"]) - (now - timedelta(days=90)) < timedelta(minutes=3)
    async with running.session.get(f"{running.url}/api/v1/admin/stats/codes/216998-D?bucket=weekly") as resp:
        assert resp.status == 400 and "1mo" in (await resp.json())["error"]["message"]


async def test_counters_are_pruned_by_their_tier_and_months_stay(running: Running) -> None:
    await running.drop("D.lic", running.vendor.issue(license_spec("D", items=[item("dev", quantity=50)])))
    assert (await running.handshake(handshakeCode="216998-D", clientUuid="dev-0"))[0] == 200
    await running.server.roll_up()

    async def sizes() -> dict[str, int]:
        return dict(await running.sql("SELECT size, SUM(granted) FROM rollups WHERE scope = 'code' GROUP BY size"))

    assert await sizes() == {"3m": 1, "2h": 1, "1d": 1, MONTH: 1, "all": 1}
    running.clock.advance(days=91)
    await relogin(running)
    assert await running.server.prune_rollups() == (1, 4)  # the device's day row; 3m and 2h, code and item
    assert await sizes() == {"1d": 1, MONTH: 1, "all": 1}
    running.clock.advance(days=730 - 91)
    assert (await running.server.prune_rollups())[1] == 2
    assert await sizes() == {MONTH: 1, "all": 1}
    await relogin(running)
    async with running.session.get(f"{running.url}/api/v1/admin/stats/codes/216998-D",
                                   params={"bucket": "1mo", "from": iso(running.clock() - timedelta(days=800))}) as resp:
        body = await resp.json()
    assert sum(b["granted"] for b in body["series"]) == 1 and body["summary"]["all"]["granted"] == 1


async def test_the_portal_says_when_detail_is_no_longer_kept_and_shows_months_for_old_periods(
        running: Running) -> None:
    from tests.test_portal import portal_session

    await running.drop("D.lic", running.vendor.issue(license_spec("D", items=[item("dev", quantity=50)])))
    assert (await running.handshake(handshakeCode="216998-D", clientUuid="dev-0"))[0] == 200
    await running.server.roll_up()
    s = await portal_session(running)
    try:
        today = running.clock().date()
        async with s.get(f"{running.url}/portal/stats/code/216998-D", params={"day": str(today)}) as resp:
            assert 'id="retention"' not in await resp.text()
        async with s.get(f"{running.url}/portal/stats/code/216998-D",
                         params={"day": str(today - timedelta(days=100))}) as resp:
            text = await resp.text()
        assert resp.status == 200 and "3-minute detail is kept from" in text
        # Three years: older than the daily buckets kept (730 days), so one row per month.
        async with s.get(f"{running.url}/portal/stats/code/216998-D",
                         params={"from": str(today - timedelta(days=1095)), "to": str(today)}) as resp:
            text = await resp.text()
        assert resp.status == 200 and 'id="retention"' not in text
        assert "<h2>Per month</h2>" in text
        labels = set(re.findall(r"\b\d\d-(\d\d) 00:00\b", text))
        assert labels == {"01"}  # the first of each month, no other day
    finally:
        await s.close()


@pytest.mark.parametrize(("stats", "needle"), [
    ({"hourly_days": 30}, "stats.hourly_days': 30 days is too short"),
    ({"daily_days": 10}, "stats.daily_days': 10 days is too short"),
    ({"hourly_days": 400, "daily_days": 365}, "at least as long"),
    ({"hourly_days": 0, "daily_days": 365}, "at least as long"),
])
def test_retention_settings_that_would_lose_late_records_are_refused(tmp_path: Path, stats: dict,
                                                                      needle: str) -> None:
    with pytest.raises(config_mod.ConfigError, match=needle):
        config_mod.load(write_config(tmp_path, None, stats=stats), environ={})
    assert config_mod.load(write_config(tmp_path, None, stats={"hourly_days": 0, "daily_days": 0}), environ={})


# -- converting a database the release before made ----------------------------------------------------------


def old_events(now: datetime) -> list[Event]:
    """Two weeks of traffic up to `now`, and a month before (marks the release before pruned, or would have)."""
    out = []
    for day in [*range(14), 35, 36]:
        for hour in range(0, 24, 5):
            at = now - timedelta(days=day, hours=hour)
            for d in range(5):
                at_d = at + timedelta(minutes=d)
                out.append(Event(at=at_d, type="handshake", code="216998-D", item_id="dev", client_uuid=f"dev-{d}",
                                 result=0 if d < 4 else 120))
                out.append(Event(at=at_d, type="handshake", code="216998-C", item_id="conc",
                                 client_uuid=f"conc-{d}", result=0))
                out.append(Event(at=at_d, type="usage.record", code="216998-I", item_id="inst",
                                 client_uuid=f"srv-{d % 2}", units=1, instances=1 + d % 3))
    return out


def later_events(now: datetime) -> list[Event]:
    """After the conversion: records for slices the devices were already counted in (a day late), for new
    slices, and new devices."""
    out = []
    for d in range(6):
        for at in (now - timedelta(days=1), now - timedelta(days=1, minutes=-9), now + timedelta(minutes=1)):
            out.append(Event(at=at + timedelta(minutes=d), type="usage.record", code="216998-C", item_id="conc",
                             client_uuid=f"conc-{d}", units=1))
            out.append(Event(at=at + timedelta(minutes=d), type="usage.record", code="216998-I", item_id="inst",
                             client_uuid=f"srv-{d % 2}", units=1, instances=3))
        out.append(Event(at=now, type="handshake", code="216998-D", item_id="dev", client_uuid=f"dev-{d}", result=0))
    return out


class OldDatabase:
    """A database on `backend` made by the release before: its schema, its rollups of old_events."""

    def __init__(self, backend: str, url: str | None, path: Path | None) -> None:
        self.backend, self.url, self.path = backend, url, path

    @classmethod
    async def make(cls, request: pytest.FixtureRequest, backend: str, folder: Path, now: datetime) -> OldDatabase:
        url = path = None
        if backend == "postgresql":
            url = await request.getfixturevalue("pg_server").new_database()
            await legacy.create_postgres(url)
        else:
            folder.mkdir(parents=True)
            path = folder / "db.sqlite3"
            legacy.create_sqlite(path)
        db = cls(backend, url, path)
        await db.run(legacy.insert_events(list(legacy_rows(old_events(now)))))
        await db.roll_up()
        # As the release before left it: marks older than 31 days pruned, but not those of the last hour's
        # horizon (its prune ran hourly).
        await db.run(legacy.prune_rollup_marks(to_ms(now - timedelta(days=35, hours=12))))
        return db

    async def run(self, proc: sql_mod.Procedure[Any]) -> Any:
        if self.url:
            return await legacy.run_postgres(self.url, proc)
        assert self.path is not None
        return legacy.run_sqlite(self.path, proc)

    async def roll_up(self) -> int:
        overuse = 0
        while (result := await self.run(legacy.roll_up(QUANTITIES, 50))).processed:
            overuse += sum(result.overuse.values())
        return overuse

    def store(self) -> Store:
        return PostgresStore(self.url) if self.url else SQLiteStore(self.path)  # type: ignore[arg-type]


async def counters_of(store: Store) -> dict[tuple, tuple]:
    return {tuple(r[:4]): tuple(r[4:]) for r in await query(store, COUNTER_COLUMNS)}


async def marks_of(store: Store) -> tuple[dict, dict]:
    """The marks by client UUID and (scope, key), whatever numbers the conversion gave."""
    keys = {kid: (scope, key) for kid, scope, key in await query(store, "SELECT id, scope, key FROM rollup_keys")}
    clients = {}
    uuid_of = {}
    for client, cid, data in await query(store, "SELECT client_uuid, id, marks FROM rollup_clients"):
        uuid_of[cid] = client
        clients[client] = {keys[k]: v for k, v in decode_client(bytes(data)).items()}
    days = {}
    for day, cid, data in await query(store, "SELECT day, client, marks FROM rollup_days"):
        days[(uuid_of[cid], day)] = {keys[k]: v for k, v in decode_day(bytes(data)).items()}
    return clients, days


async def convert(store: Store, now: datetime, limit: int = 2000) -> int:
    steps = 0
    while await store.convert_marks(to_ms(now), limit):
        steps += 1
    return steps


async def test_a_database_of_the_release_before_is_converted_and_counts_on(
        request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> None:
    now = BASE + timedelta(days=40, hours=15, minutes=7)
    old = await OldDatabase.make(request, backend, tmp_path / "a", now)
    expected = await OldDatabase.make(request, backend, tmp_path / "b", now)  # stays in the old shape
    store = old.store()
    await store.open()  # migrates: the marks wait to be converted; nothing is folded meanwhile
    try:
        before = await counters_of(store)
        assert await store.rollup_conversion() == 1
        await store.write(WriteBatch(events=later_events(now), at=now))
        assert (await store.roll_up(QUANTITIES)).processed == 0
        assert await convert(store, now, 300) > 3
        assert await store.rollup_conversion() == 0
        assert await query(store, "SELECT COUNT(*) FROM rollup_devices") == [(0,)]
        after = await counters_of(store)
        assert {k: v for k, v in after.items() if k[2] != MONTH} == before
        # Monthly counters: the daily ones summed; devices from the first month the marks wholly covered.
        monthly_from = (await query(store, "SELECT monthly_from_ms FROM rollup_state"))[0][0]
        assert monthly_from == to_ms(datetime(2026, 4, 1, tzinfo=UTC))  # the marks kept reach back to March 10
        sums: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
        for (scope, key, size, bucket), v in before.items():
            if size == "1d":
                for i in range(3):
                    sums[(scope, key, MONTH, bucket_start(bucket, MONTH))][i] += v[i]
        assert {k: list(v[:3]) for k, v in after.items() if k[2] == MONTH} == dict(sums)
        distinct = month_devices(old_events(now))
        assert {k: v[3] for k, v in after.items() if k[2] == MONTH} == {
            k: (distinct.get(k, 0) if k[3] >= monthly_from else 0) for k in sums}
        # The events that waited, then more: counted as the release before counts them.
        overuse = 0
        while (result := await store.roll_up(QUANTITIES, 7)).processed:
            overuse += sum(result.overuse.values())
        await expected.run(legacy.insert_events(list(legacy_rows(later_events(now)))))
        assert overuse == await expected.roll_up()
        got = await counters_of(store)
        exp_store = expected.store()
        await exp_store.open()
        try:  # (the expected database is migrated now, but was rolled up by the legacy procedure first)
            assert {k: v for k, v in got.items() if k[2] != MONTH} == \
                {k: v for k, v in (await counters_of(exp_store)).items() if k[2] != MONTH}
        finally:
            await exp_store.close()
    finally:
        await store.close()


async def test_an_interrupted_conversion_goes_on_where_it_stopped(
        request: pytest.FixtureRequest, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = BASE + timedelta(days=40, hours=15, minutes=7)
    straight = (await OldDatabase.make(request, backend, tmp_path / "a", now)).store()
    await straight.open()
    await convert(straight, now)
    interrupted = await OldDatabase.make(request, backend, tmp_path / "b", now)
    store = interrupted.store()
    await store.open()
    try:
        for _ in range(3):
            assert await store.convert_marks(to_ms(now), 50)
    finally:
        await store.close()  # stopped between two steps
    real, calls = sql_mod.encode_day, 0

    def failing(row: Any) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 20:
            raise RuntimeError("the step fails here")
        return real(row)

    store = interrupted.store()
    await store.open()
    try:
        monkeypatch.setattr(sql_mod, "encode_day", failing)
        with pytest.raises(RuntimeError):  # a step fails half-way: its transaction is undone
            while await store.convert_marks(to_ms(now), 50):
                pass
        monkeypatch.setattr(sql_mod, "encode_day", real)
        steps = await convert(store, now, 50)
        assert steps > 3
        assert await marks_of(store) == await marks_of(straight)
        assert await counters_of(store) == await counters_of(straight)
        assert await store.rollup_conversion() == 0
    finally:
        await store.close()
        await straight.close()


# -- the state folder the release before left, through HTTP -----------------------------------------------------


async def fixture_server(request: pytest.FixtureRequest, backend: str, folder: Path) -> tuple[Server, Clock]:
    """A server of this release on a copy of tests/data/previous-release (on PostgreSQL: moved there with
    `lts-server migrate`), its clock where that release stopped."""
    meta = json.loads((FIXTURE / "meta.json").read_text())
    shutil.copytree(FIXTURE / "state", folder / "state")
    db = folder / "state" / "lts-server.sqlite3"
    db.write_bytes(gzip.decompress((folder / "state" / "lts-server.sqlite3.gz").read_bytes()))
    (folder / "state" / "lts-server.sqlite3.gz").unlink()
    storage: dict[str, Any] = {"state_dir": str(folder / "state")}
    if backend == "postgresql":
        url = await request.getfixturevalue("pg_server").new_database()
        counts = await migrate_mod.migrate(config_mod.load(write_config(folder, None, storage=storage), environ={}),
                                           url)
        assert counts.counts["rollup_devices"] > 0
        storage.update(backend="postgresql", url=url, follow_ms=50)
    clock = Clock(parse_iso(meta["now"]))
    server = Server(config_mod.load(write_config(folder, None, storage=storage), environ={}), clock=clock)
    await server.start()
    return server, clock


async def test_the_state_the_release_before_left_answers_the_same(request: pytest.FixtureRequest, backend: str,
                                                                  tmp_path: Path) -> None:
    meta = json.loads((FIXTURE / "meta.json").read_text())
    server, clock = await fixture_server(request, backend, tmp_path)
    try:
        await server.roll_up()  # converts, then folds
        assert server.services is not None
        store = server.services.store
        assert await query(store, "SELECT COUNT(*) FROM rollup_devices") == [(0,)]
        assert {i: s.overuse_used for i, s in server.services.ledger.statuses.items()} == meta["overuse"]
        token = await admin_login(server.urls[0])
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:

            async def stats(path: str, params: dict) -> dict:
                async with session.get(f"{server.urls[0]}/api/v1/admin/stats/{path}", params=params) as resp:
                    assert resp.status == 200
                    return await resp.json()

            for name, expected in meta["expected"].items():
                body = await stats(name.split(" ")[0], expected["params"])
                assert len(body["series"]) == expected["buckets"], name
                assert [b for b in body["series"] if any(v for k, v in b.items() if k != "start")] == \
                    expected["series"], name
                assert body["summary"] == expected["summary"], name
            # It counts on from the marks it converted. Every hour at :30 conc-0 reported the slices of :30,
            # :27 and :24 (make.py): a day-late report for :27 counts nothing new, one for :33 counts the device
            # in that 3-minute bucket and in none of its larger buckets (it was active in them).
            half_past = clock().replace(minute=30, second=0) - timedelta(hours=25)
            before = {b: await stats("items/conc", {"bucket": b, "from": iso(half_past - timedelta(hours=3)),
                                                    "to": iso(half_past + timedelta(hours=3))})
                      for b in ("3m", "2h", "1d")}
            status, answer = await handshake_and_report(server, session, clock, "conc-0", [
                half_past - timedelta(minutes=3), half_past + timedelta(minutes=3)])
            assert status == 200, answer
            await server.roll_up()
            after = {b: await stats("items/conc", {"bucket": b, "from": iso(half_past - timedelta(hours=3)),
                                                   "to": iso(half_past + timedelta(hours=3))})
                     for b in ("3m", "2h", "1d")}
            devices = {b: {x["start"]: x["devices"] for x in after[b]["series"]} for b in after}
            old = {b: {x["start"]: x["devices"] for x in before[b]["series"]} for b in before}
            assert devices["3m"][iso(half_past - timedelta(minutes=3))] == old["3m"][
                iso(half_past - timedelta(minutes=3))] == 3
            assert devices["3m"][iso(half_past + timedelta(minutes=3))] == 1 + old["3m"][
                iso(half_past + timedelta(minutes=3))]
            assert devices["2h"] == old["2h"] and devices["1d"] == old["1d"]
    finally:
        await server.stop()


async def handshake_and_report(server: Server, session: aiohttp.ClientSession, clock: Clock, client: str,
                               slots: list[datetime]) -> tuple[int, dict]:
    """A handshake of `client` on code 216998-C now (for a fresh report key), then a report of `slots`."""
    import base64

    from lts_client import MAC_HEADER, report_mac

    url = server.urls[0]
    async with session.post(f"{url}/api/v1/handshake", json={
            "handshakeCode": "216998-C", "clientUuid": client, "product": "barcode-reader",
            "deploymentType": "browser"}) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
    data = json.dumps({"reportId": f"late-{client}", "clientUuid": client, "handshakeCode": "216998-C",
                       "records": [{"slot": iso(s), "product": "barcode-reader", "operation": "scan", "count": 1}
                                   for s in slots]}).encode()
    async with session.post(f"{url}/api/v1/usage", data=data, headers={
            "Content-Type": "application/json",
            MAC_HEADER: report_mac(base64.b64decode(answer["reportKey"]), data)}) as resp:
        return resp.status, await resp.json()


def test_month_index_and_buckets() -> None:
    assert month_index(to_ms(datetime(1970, 1, 31, tzinfo=UTC))) == 0
    assert month_index(to_ms(datetime(2026, 3, 1, tzinfo=UTC))) == 56 * 12 + 2
    assert from_ms(bucket_start(to_ms(datetime(2024, 2, 29, 23, 59, tzinfo=UTC)), MONTH)) == \
        datetime(2024, 2, 1, tzinfo=UTC)
    assert to_ms(datetime(2024, 3, 1, tzinfo=UTC)) - to_ms(datetime(2024, 2, 1, tzinfo=UTC)) == 29 * DAY_MS
