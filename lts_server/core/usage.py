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


@dataclass
class Aggregate:
    """Increments from a run of events, before distinct devices are known."""

    counters: dict[tuple[str, str, str, int], Counters] = field(default_factory=lambda: defaultdict(Counters))
    # (scope, key, size, bucket, client) -> instances active (max seen)
    devices: dict[tuple[str, str, str, int, str], int] = field(default_factory=dict)


def aggregate(events: Iterable[EventFacts]) -> Aggregate:
    agg = Aggregate()
    for e in events:
        if e.type == "handshake":
            granted = e.result == 0
            active = granted
            units = 0
        elif e.type == "usage.record":
            granted = None
            active = True
            units = e.units or 0
        else:
            continue
        scopes = []
        if e.code:
            scopes.append(("code", e.code))
        if e.item_id:
            scopes.append(("item", e.item_id))
        for scope, key in scopes:
            for size in SIZES:
                b = bucket_start(e.at_ms, size)
                c = agg.counters[(scope, key, size, b)]
                if granted is True:
                    c.granted += 1
                elif granted is False:
                    c.refused += 1
                c.units += units
                if active and e.client_uuid:
                    k = (scope, key, size, b, e.client_uuid)
                    agg.devices[k] = max(agg.devices.get(k, 0), e.instances or 0)
    return agg


def overuse_delta(before: int, after: int, quantity: int) -> int:
    """Instance-slices beyond the quantity added when a slice's total goes from before to after."""
    return max(0, after - quantity) - max(0, before - quantity)


def tolerance(quantity: int) -> int:
    return CONCURRENT_TOLERANCE_FACTOR * quantity
