"""Usage: report validation, time buckets, and the rollup arithmetic (pure)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from lts_server.core.model import CONCURRENT_TOLERANCE_FACTOR, SLICE

MAX_LATE = timedelta(days=30)
MAX_SKEW = timedelta(minutes=5)
MAX_RECORDS = 1000
MAX_COUNT = 10_000_000  # units one device can report for one 3-minute slice

SLICE_MS = int(SLICE.total_seconds() * 1000)
BUCKETS: dict[str, int] = {"3m": SLICE_MS, "2h": 2 * 3600 * 1000, "1d": 24 * 3600 * 1000}
SIZES = (*BUCKETS, "all")


def bucket_start(at_ms: int, size: str) -> int:
    if size == "all":
        return 0
    width = BUCKETS[size]
    return at_ms - at_ms % width


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


@dataclass(frozen=True)
class EventFacts:
    """What the rollups need of one event."""

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


Bucket = tuple[str, str, str, int]  # scope, key, size, bucket start (ms)


@dataclass
class Aggregate:
    """Increments from a run of events, before the devices already counted are known."""

    counters: dict[Bucket, Counters] = field(default_factory=dict)
    # The devices active in each bucket, with the instances each was granted.
    devices: dict[Bucket, dict[str, int]] = field(default_factory=dict)


def aggregate(events: Iterable[EventFacts]) -> Aggregate:
    """Count per 3-minute bucket, then fold those into the larger sizes (cheaper than per event)."""
    counters: dict[Bucket, Counters] = defaultdict(Counters)
    devices: dict[Bucket, dict[str, int]] = defaultdict(dict)
    for e in events:
        if e.type == "handshake":
            granted: bool | None = e.result == 0
            active = granted
        elif e.type == "usage.record":
            granted, active = None, True
        else:
            continue
        slot = e.at_ms - e.at_ms % SLICE_MS
        for scope, key in (("code", e.code), ("item", e.item_id)):
            if not key:
                continue
            k = (scope, key, "3m", slot)
            c = counters[k]
            if granted is True:
                c.granted += 1
            elif granted is False:
                c.refused += 1
            elif e.units:
                c.units += e.units
            if active and e.client_uuid:
                seen = devices[k]
                instances = (e.instances or 0) if scope == "item" else 0
                if seen.get(e.client_uuid, -1) < instances:
                    seen[e.client_uuid] = instances
    agg = Aggregate(dict(counters), dict(devices))
    for (scope, key, _, slot), c in counters.items():
        for size in SIZES[1:]:
            total = agg.counters.setdefault((scope, key, size, bucket_start(slot, size)), Counters())
            total.granted += c.granted
            total.refused += c.refused
            total.units += c.units
    for (scope, key, _, slot), seen in devices.items():
        for size in SIZES[1:]:
            merged = agg.devices.setdefault((scope, key, size, bucket_start(slot, size)), {})
            for client, instances in seen.items():
                if merged.get(client, -1) < instances:
                    merged[client] = instances
    return agg


def overuse_delta(before: int, after: int, quantity: int) -> int:
    """Device- or instance-slices beyond the quantity added when a slice's total goes from before to after."""
    return max(0, after - quantity) - max(0, before - quantity)


def tolerance(quantity: int) -> int:
    return CONCURRENT_TOLERANCE_FACTOR * quantity
