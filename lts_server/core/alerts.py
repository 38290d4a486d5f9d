"""Usage alerts: which conditions are met, at which level, and which are new (pure).

The shell gathers plain facts (items and their live counters, per-code request
counts over the failure window, rejected license files) and a `now`; this
module answers with the conditions met. `transition` compares them with the
levels already notified and says what is new (one notification holds all of
it) and what has cleared. A condition alerts once per level; a level that is
no longer met clears, so reaching it again alerts again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from lts_server.core.model import (
    CONCURRENT_TOLERANCE_FACTOR,
    EXPIRY_GRACE,
    Counts,
    Item,
    ItemStatus,
    Period,
    hard_limit,
)


# Alerts raised when something happens rather than found by a check; always on: a server that
# grants nothing, or a client UUID in use on two machines, always needs someone's attention.
CLOCK_ALERT = "clock"  # the server's clock fell behind its records
CLONE_ALERT = "clone"  # a client UUID asked from a second device (151)


class Kind(StrEnum):
    """The conditions an admin can switch on or off, by name."""

    SEATS = "seats"  # per-device and per-server items
    UNITS = "units"  # per-scan and per-page items
    OVERUSE = "overuse"  # concurrent-device and concurrent-instance items
    FAILURES = "failures"  # failed authorizations per handshake code
    EXPIRY = "expiry"  # items expiring soon, or expired
    IMPORT = "import"  # license files the importer rejected


SEAT_LEVELS = (60, 80, 100)
DAILY_SEAT_LEVELS = (100,)
UNIT_LEVELS = (60, 80, 100)
OVERUSE_LEVELS = (60, 80, 100)
FAILURE_LEVELS = (10, 20, 40, 60, 80, 100)
# The level beyond 100% at which new devices (seats: +10%) or every device
# (units: +5%) are refused: the item's hard limit, whatever the rounding.
SEATS_REFUSING = 110
UNITS_REFUSING = 105
# Expiry levels: higher is worse.
EXPIRES_30_DAYS, EXPIRES_7_DAYS, EXPIRED = 1, 2, 3
EXPIRY_NOTICE = {EXPIRES_30_DAYS: timedelta(days=30), EXPIRES_7_DAYS: timedelta(days=7)}


@dataclass(frozen=True)
class FailureWindow:
    """How failed authorizations are judged: over `minutes`, once a code had `min_requests`."""

    minutes: int = 60
    min_requests: int = 20


@dataclass(frozen=True)
class CodeRequests:
    granted: int
    refused: int


@dataclass(frozen=True)
class RejectedFile:
    path: str
    reason: str


@dataclass(frozen=True)
class Facts:
    """Everything a check reads, as plain data."""

    items: Mapping[str, Item]
    statuses: Mapping[str, ItemStatus]
    code_requests: Mapping[str, CodeRequests] = field(default_factory=dict)
    rejected_files: tuple[RejectedFile, ...] = ()


@dataclass(frozen=True)
class Condition:
    """One met condition at its highest level reached."""

    key: str  # stable identity: "{kind}:{subject}"
    kind: Kind
    subject: str  # item id, code name or file path
    level: int  # percent reached, or an expiry level; higher is worse
    label: str  # the level for people: "80%", "expires within 7 days"
    message: str
    link: str  # portal path of what caused it


def _quota(out: list[Condition], item: Item, kind: Kind, used: int, levels: Iterable[int], refusing: int,
           link: str, usage: str, refused: str, of_what: str) -> None:
    """A seat or unit condition: the highest level reached, or `refusing` once the hard limit is."""
    level = _percent_level(used, item.quantity, levels)
    limit = hard_limit(item.license_type, item.quantity)
    if used >= limit:
        level = refusing
    if level is None:
        return
    what = refused if level == refusing else f"{level}% {of_what}"
    out.append(Condition(f"{kind.value}:{item.item_id}", kind, item.item_id, level, f"{level}%",
                         f"Item {item.item_id} ({item.product}, {item.license_type}) "
                         f"{usage.format(used=used, quantity=item.quantity)} (limit with grace {limit:,}): {what}.",
                         link))


def _percent_level(used: int, whole: int, levels: Iterable[int]) -> int | None:
    """The highest level p with used >= p% of whole (integer arithmetic: no float edge cases)."""
    reached = None
    for p in levels:
        if whole > 0 and used * 100 >= p * whole:
            reached = p
    return reached


def item_conditions(item: Item, status: ItemStatus, now: datetime) -> list[Condition]:
    """The usage and expiry conditions an item meets. Revoked items raise none: nobody draws on them."""
    if status.revoked:
        return []
    out: list[Condition] = []
    link = f"/portal/stats/item/{item.item_id}"
    counts = item.rules.counts
    in_use = item.starts_at <= now < item.expires_at + EXPIRY_GRACE
    if in_use and counts is Counts.SEATS:
        levels = DAILY_SEAT_LEVELS if item.period is Period.DAILY else SEAT_LEVELS
        _quota(out, item, Kind.SEATS, status.seats_used, levels, SEATS_REFUSING, link,
               "has {used:,} of {quantity:,} seats in use", "new devices are refused",
               f"of its {item.quantity:,} seats")
    elif in_use and counts is Counts.UNITS:
        _quota(out, item, Kind.UNITS, status.units_used, UNIT_LEVELS, UNITS_REFUSING, link,
               "has used {used:,} of {quantity:,} units", "every device is refused", "of its quota")
    elif in_use and counts in (Counts.CONCURRENCY, Counts.INSTANCES):
        allowance = CONCURRENT_TOLERANCE_FACTOR * item.quantity
        level = _percent_level(status.overuse_used, allowance, OVERUSE_LEVELS)
        if status.overused:
            level = 100
        if level is not None:
            out.append(Condition(f"overuse:{item.item_id}", Kind.OVERUSE, item.item_id, level, f"{level}%",
                                 f"Item {item.item_id} ({item.product}, {item.license_type}) has used "
                                 f"{status.overuse_used:,} of its overuse allowance of {allowance:,} "
                                 f"slices ({level}%)"
                                 + (": only its quantity is granted now." if level == 100 else "."), link))
    expiry = expiry_level(item, now)
    if expiry is not None:
        if expiry == EXPIRED:
            label, text = "expired", f"expired on {item.expires_at:%Y-%m-%d}"
        else:
            days = max(0, (item.expires_at - now).days)
            label = "expires within 30 days" if expiry == EXPIRES_30_DAYS else "expires within 7 days"
            text = f"expires on {item.expires_at:%Y-%m-%d} (in {days} days)"
        out.append(Condition(f"expiry:{item.item_id}", Kind.EXPIRY, item.item_id, expiry, label,
                             f"Item {item.item_id} ({item.product}, {item.license_type}) {text}.", link))
    return out


def expiry_level(item: Item, now: datetime) -> int | None:
    if now >= item.expires_at:
        return EXPIRED
    left = item.expires_at - now
    if left <= EXPIRY_NOTICE[EXPIRES_7_DAYS]:
        return EXPIRES_7_DAYS
    if left <= EXPIRY_NOTICE[EXPIRES_30_DAYS]:
        return EXPIRES_30_DAYS
    return None


def code_condition(code: str, requests: CodeRequests, window: FailureWindow) -> Condition | None:
    """Failed authorizations of one code over the window; below min_requests nothing is judged."""
    total = requests.granted + requests.refused
    if total < window.min_requests:
        return None
    level = _percent_level(requests.refused, total, FAILURE_LEVELS)
    if level is None:
        return None
    return Condition(f"failures:{code}", Kind.FAILURES, code, level, f"{level}%",
                     f"Handshake code {code}: {requests.refused:,} of {total:,} authorizations failed in the "
                     f"last {window.minutes} minutes ({requests.refused * 100 // total}%).",
                     f"/portal/stats/code/{code}")


def conditions(facts: Facts, now: datetime, window: FailureWindow,
               enabled: frozenset[Kind] = frozenset(Kind)) -> list[Condition]:
    """Every condition met now, of the enabled kinds, problems in a stable order."""
    out: list[Condition] = []
    for item_id in sorted(facts.items):
        out.extend(item_conditions(facts.items[item_id], facts.statuses.get(item_id) or ItemStatus(), now))
    for code in sorted(facts.code_requests):
        c = code_condition(code, facts.code_requests[code], window)
        if c is not None:
            out.append(c)
    for f in sorted(facts.rejected_files, key=lambda f: f.path):
        out.append(Condition(f"import:{f.path}", Kind.IMPORT, f.path, 1, "rejected",
                             f"License file {f.path} was rejected: {f.reason}", "/portal/items"))
    return [c for c in out if c.kind in enabled]


@dataclass(frozen=True)
class Transition:
    new: tuple[Condition, ...]  # met at a level not notified yet: one notification holds them all
    levels: dict[str, int]  # the notified level of every open condition after this check
    cleared: tuple[str, ...]  # keys no longer met at all


def transition(met: Iterable[Condition], notified: Mapping[str, int],
               settling: frozenset[str] = frozenset()) -> Transition:
    """Compare the conditions met now with the levels already notified.

    A condition is new when its level is above the one notified. A condition
    whose level fell keeps the lower level, so the higher one alerts again
    when reached again; one no longer met at all is cleared. Conditions in
    `settling` (notified moments ago) neither fall nor clear yet: a check that
    saw an older state (another node lagging behind) must not make the next
    check alert the same level again.
    """
    new: list[Condition] = []
    levels: dict[str, int] = {}
    for c in met:
        before = notified.get(c.key)
        if before is None or c.level > before:
            new.append(c)
        levels[c.key] = max(c.level, before) if before is not None and c.key in settling else c.level
    for key in settling:
        if key not in levels and key in notified:
            levels[key] = notified[key]
    cleared = tuple(sorted(k for k in notified if k not in levels))
    return Transition(tuple(new), levels, cleared)


def condition_json(c: Condition) -> dict[str, object]:
    """A condition as notifications carry it (e-mail text and webhook JSON are made from this)."""
    return {"key": c.key, "kind": c.kind.value, "subject": c.subject, "level": c.level, "label": c.label,
            "message": c.message, "link": c.link}


def subject_line(new: tuple[Condition, ...]) -> str:
    """The e-mail subject of a notification."""
    if len(new) == 1:
        c = new[0]
        return f"[lts-server] alert: {c.kind} {c.subject} {c.label}"
    return f"[lts-server] {len(new)} new alerts: " + ", ".join(f"{c.kind} {c.subject} {c.label}" for c in new[:3]) + (
        ", ..." if len(new) > 3 else "")
