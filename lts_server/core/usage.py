"""Usage: report validation, time buckets, and the rollup arithmetic (pure)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import NamedTuple

from lts_server.core.marks import KeyDay, Marks
from lts_server.core.model import CONCURRENT_TOLERANCE_FACTOR, SLICE

MAX_LATE = timedelta(days=30)
MAX_SKEW = timedelta(minutes=5)
MAX_RECORDS = 1000
MAX_COUNT = 10_000_000  # units one device can report for one 3-minute slice

SLICE_MS = int(SLICE.total_seconds() * 1000)
HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS
SLICES_PER_HOUR = HOUR_MS // SLICE_MS  # 20
BUCKETS: dict[str, int] = {"3m": SLICE_MS, "2h": 2 * HOUR_MS, "1d": DAY_MS}
MONTH = "1mo"  # calendar months (UTC): no fixed width
SERIES = (*BUCKETS, MONTH)  # the bucket sizes a statistics series can be asked in
SIZES = (*SERIES, "all")
# How long a device's marks must be kept: a usage record may come 30 days late (a day's margin).
MARKS_DAYS = MAX_LATE.days + 1


def month_index(at_ms: int) -> int:
    """Months since January 1970 (UTC)."""
    return _month_of_day(at_ms // DAY_MS)


@lru_cache(maxsize=4096)
def _month_of_day(day: int) -> int:
    t = datetime.fromtimestamp(day * 86400, UTC)
    return (t.year - 1970) * 12 + t.month - 1


@lru_cache(maxsize=4096)
def month_start_ms(index: int) -> int:
    return int(datetime(1970 + index // 12, index % 12 + 1, 1, tzinfo=UTC).timestamp() * 1000)


def bucket_start(at_ms: int, size: str) -> int:
    if size == "all":
        return 0
    if size == MONTH:
        return month_start_ms(month_index(at_ms))
    width = BUCKETS[size]
    return at_ms - at_ms % width


def next_bucket(start_ms: int, size: str) -> int:
    """The start of the bucket after the one starting at start_ms."""
    if size == MONTH:
        return month_start_ms(month_index(start_ms) + 1)
    return start_ms + BUCKETS[size]


def bucket_count(start_ms: int, end_ms: int, size: str) -> int:
    """How many buckets of `size` from the one holding start_ms up to end_ms (about, for months)."""
    if size == MONTH:
        return month_index(end_ms) - month_index(start_ms) + 1
    return -(-(end_ms - bucket_start(start_ms, size)) // BUCKETS[size])


def slot_problem(slot: datetime, now: datetime) -> str | None:
    """Why a record's slot is not acceptable, or None."""
    if slot.tzinfo is None:
        return "must carry a time zone (UTC)"
    if int(slot.timestamp() * 1000) % SLICE_MS:
        return "must be the start of a 3-minute slice (00:00, 00:03, ... UTC)"
    if slot > now + MAX_SKEW:
        return "is in the future beyond 5 minutes of clock skew"
    if slot < now - MAX_LATE:
        return "is more than 30 days old"
    return None


class EventFacts(NamedTuple):
    """What the rollups need of one event (a row of the event log's columns, in this order)."""

    seq: int
    at_ms: int
    type: str
    code: str | None
    item_id: str | None
    client_uuid: str | None
    result: int | None
    units: int | None
    instances: int | None


@dataclass
class Counters:
    granted: int = 0
    refused: int = 0
    units: int = 0
    devices: int = 0
    instances: int = 0


Bucket = tuple[str, str, str, int]  # scope, key, size, bucket start (ms)
Key = tuple[str, str]  # scope ('code' or 'item'), code name or item id


class Activity(NamedTuple):
    """A device active on a code or an item in every 3-minute slice from start_ms (a slice start) up to
    end_ms: it counts once in each bucket those slices fall in. `instances` (items only): the instances
    it ran, for items counted per instance."""

    scope: str
    key: str
    client_uuid: str
    start_ms: int
    end_ms: int
    instances: int = 0


def activities(events: Iterable[EventFacts]) -> list[Activity]:
    """Who the events show active, where: granted handshakes and usage records, each in its own slice."""
    out = []
    for e in events:
        if not e.client_uuid or not (e.type == "usage.record" or (e.type == "handshake" and e.result == 0)):
            continue
        slot = e.at_ms - e.at_ms % SLICE_MS
        if e.code:
            out.append(Activity("code", e.code, e.client_uuid, slot, slot + SLICE_MS))
        if e.item_id:
            out.append(Activity("item", e.item_id, e.client_uuid, slot, slot + SLICE_MS, e.instances or 0))
    return out


def count_events(events: Iterable[EventFacts]) -> dict[Bucket, Counters]:
    """Granted and refused handshakes and units, per code and item and bucket of every size: counted per
    3-minute bucket, then folded into the larger sizes (cheaper than per event)."""
    slices: dict[Bucket, Counters] = defaultdict(Counters)
    for e in events:
        if e.type not in ("handshake", "usage.record"):
            continue
        slot = e.at_ms - e.at_ms % SLICE_MS
        for scope, key in (("code", e.code), ("item", e.item_id)):
            if not key:
                continue
            c = slices[(scope, key, "3m", slot)]
            if e.type == "usage.record":
                c.units += e.units or 0
            elif e.result == 0:
                c.granted += 1
            else:
                c.refused += 1
    counters = dict(slices)
    for (scope, key, _, slot), c in slices.items():
        for size in SIZES[1:]:
            total = counters.setdefault((scope, key, size, bucket_start(slot, size)), Counters())
            total.granted += c.granted
            total.refused += c.refused
            total.units += c.units
    return counters


# -- device marks: who was already counted where (core/marks.py) ------------------------------------


def days_touched(acts: Iterable[Activity]) -> set[tuple[str, int]]:
    """The (client, day) rows folding `acts` reads."""
    out = set()
    for a in acts:
        first, last = a.start_ms // DAY_MS, (a.end_ms - 1) // DAY_MS
        if first == last:
            out.add((a.client_uuid, first))
        else:
            out.update((a.client_uuid, day) for day in range(first, last + 1))
    return out


@dataclass
class Fold:
    counters: dict[Bucket, Counters]
    # Devices (concurrent-device items) or instances (concurrent-instance items) added per item and
    # 3-minute slice: what the overuse counters grow by, against the slice's count before this fold.
    growth: dict[tuple[str, int], int]


NEW_3M, NEW_2H, NEW_DAY, NEW_MONTH, NEW_ALL = 1, 2, 4, 8, 16
NEW_SIZES = ((NEW_3M, "3m"), (NEW_2H, "2h"), (NEW_DAY, "1d"), (NEW_MONTH, MONTH), (NEW_ALL, "all"))


def fold(events: Iterable[EventFacts], acts: Iterable[Activity], marks: Marks, key_ids: Mapping[Key, int],
         per_device: Iterable[str] = (), per_instance: Iterable[str] = (), monthly_from_ms: int = 0) -> Fold:
    """What a run of events adds to the rollups, given the marks of the devices they name (updated in place).

    `acts`: who was active where: the events' own activities (`activities`), and any that are not in the
    event log itself (a later change may add some). A device counts once per bucket of each size for each
    code and item it was active on, whenever its events come (a usage record up to 30 days late), so the
    counters equal a recount of the raw events. `per_device`, `per_instance`: the items whose slices are
    counted for overuse (by devices, by instances). Month buckets starting before monthly_from_ms count no
    devices (an older release kept no month marks).
    """
    counters = count_events(events)
    growth: dict[tuple[str, int], int] = {}
    devices, instances = set(per_device), set(per_instance)
    # Per (scope, key, slice, which sizes' buckets are new for the device): how many devices; turned into
    # the counters of those buckets at the end. This runs per device and slice: one dictionary step each.
    seen: dict[tuple[str, str, int, int], int] = {}
    grown: dict[Bucket, int] = {}
    clients, days = marks.clients, marks.days
    changed_clients, changed_days = marks.changed_clients, marks.changed_days

    for scope, key, client, start_ms, end_ms, n in acts:
        kid = key_ids[(scope, key)]
        slot = start_ms
        while slot < end_ms:
            day = slot // DAY_MS
            s = (slot - day * DAY_MS) // SLICE_MS
            at = (client, day)
            row = days.get(at)
            kd = row.get(kid) if row is not None else None
            new = 0
            if kd is None:
                # The first time that day on this key; a day row's entry is written with the device's marks
                # of the key, so those are needed only now.
                keys = clients[client].keys
                months = keys.get(kid)
                if months is None:
                    months = keys[kid] = set()
                    changed_clients.add(client)
                    new = NEW_ALL
                month = _month_of_day(day)
                if month not in months and _note_month(months, month):
                    changed_clients.add(client)
                    if month_start_ms(month) >= monthly_from_ms:
                        new |= NEW_MONTH
                if row is None:
                    row = days[at] = {}
                kd = row[kid] = KeyDay()
                new |= NEW_DAY
            elif (kd.slices >> s) & 1 and not (n and n > kd.instances.get(s, 0)):
                # Counted in this slice already, so in its day, hours and month too: nothing new.
                slot += SLICE_MS
                continue
            if not (kd.slices >> s) & 1:
                changed_days.add(at)
                if not (kd.hours >> (s // SLICES_PER_HOUR & ~1)) & 3:
                    new |= NEW_2H
                kd.slices |= 1 << s
                kd.hours |= 1 << s // SLICES_PER_HOUR
                new |= NEW_3M
                if key in devices and scope == "item":
                    growth[(key, slot)] = growth.get((key, slot), 0) + 1
            if new:
                k = (scope, key, slot, new)
                seen[k] = seen.get(k, 0) + 1
            if n and n > (before := kd.instances.get(s, 0)):
                kd.instances[s] = n
                changed_days.add(at)
                if key in instances and scope == "item":
                    b = (scope, key, "3m", slot)
                    grown[b] = grown.get(b, 0) + n - before
                    growth[(key, slot)] = growth.get((key, slot), 0) + n - before
            slot += SLICE_MS
    for (scope, key, slot, new), count in seen.items():
        for bit, size in NEW_SIZES:
            if new & bit:
                b = (scope, key, size, bucket_start(slot, size))
                c = counters.get(b)
                if c is None:
                    c = counters[b] = Counters()
                c.devices += count
    for b, count in grown.items():
        c = counters.get(b)
        if c is None:
            c = counters[b] = Counters()
        c.instances += count
    return Fold(counters, growth)


def _note_month(months: set[int], month: int) -> bool:
    """Add `month` to a device's latest months of a key; whether it is new there. A month before the three
    latest is beyond any late record: neither counted nor kept."""
    if month in months or (months and month < max(months) - 2):
        return False
    months.add(month)
    latest = max(months)
    months.intersection_update(range(latest - 2, latest + 1))
    return True


def convert_mark(marks: Marks, kid: int, key: Key, size: str, bucket_ms: int, client: str, instances: int,
                 monthly_from_ms: int, counters: dict[Bucket, Counters]) -> None:
    """Take one device mark of the release before (a rollup_devices row) into `marks`.

    Only the all-time and 3-minute marks are needed. The daily and 2-hour marks are implied by the 3-minute
    ones wherever a record can still arrive: that release dropped a mark once its bucket had ended 31 days
    before, and a record comes at most 30 days late, so a day a record can reach ended less than 31 days
    ago and still has all its 3-minute marks. Month buckets are new: a month the marks cover from its start
    (monthly_from_ms on) counts the device once, in `counters`.
    """
    months = marks.clients[client].keys.get(kid)
    if months is None:
        months = marks.clients[client].keys[kid] = set()
        marks.changed_clients.add(client)
    if size != "3m":
        return
    month = month_index(bucket_ms)
    if _note_month(months, month):
        marks.changed_clients.add(client)
        if month_start_ms(month) >= monthly_from_ms:
            c = counters.setdefault((*key, MONTH, month_start_ms(month)), Counters())
            c.devices += 1
    day = bucket_ms // DAY_MS
    kd = marks.days.setdefault((client, day), {}).setdefault(kid, KeyDay())
    s = (bucket_ms - day * DAY_MS) // SLICE_MS
    kd.slices |= 1 << s
    kd.hours |= 1 << (s // SLICES_PER_HOUR)
    if instances > kd.instances.get(s, 0):
        kd.instances[s] = instances
    marks.changed_days.add((client, day))


def overuse_delta(before: int, after: int, quantity: int) -> int:
    """Device- or instance-slices beyond the quantity added when a slice's total goes from before to after."""
    return max(0, after - quantity) - max(0, before - quantity)


def tolerance(quantity: int) -> int:
    return CONCURRENT_TOLERANCE_FACTOR * quantity
