"""Borrowing (offline checkout): how long a device may take an item offline, and until when it holds it.

An item allows borrowing when the vendor sets `borrowMaxDays` (1-365); a handshake code may lower
that (`borrowMaxDays` on the code; 0 forbids borrowing through the code). A borrowed seat is held
until `borrowedUntil` (or an early return), never past the item's expiry (its grace end once in grace).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from lts_server.core.model import EXPIRY_GRACE, HandshakeCode, Item

MAX_DAYS = 365


@dataclass(frozen=True)
class Allowed:
    days: int | None  # None: this item cannot be borrowed through this code
    why_not: str = ""


def allowed_days(item: Item, code: HandshakeCode) -> Allowed:
    """The most days a device may borrow the item through the code."""
    if not item.rules.borrowable:
        return Allowed(None, f"item {item.item_id} is {item.license_type.value}: only per-device, per-server and "
                             "per-concurrent-device items can be borrowed")
    if item.borrow_max_days is None:
        return Allowed(None, f"item {item.item_id} does not allow borrowing (no borrowMaxDays in its license)")
    if code.borrow_max_days is not None and code.borrow_max_days <= 0:
        return Allowed(None, f"handshake code {code.name} does not allow borrowing")
    days = item.borrow_max_days
    if code.borrow_max_days is not None:
        days = min(days, code.borrow_max_days)
    return Allowed(days)


def borrow_problem(item: Item, code: HandshakeCode, days: int) -> str | None:
    """Why borrowing `days` days of the item through the code is refused, or None."""
    allowed = allowed_days(item, code)
    if allowed.days is None:
        return allowed.why_not
    if days > allowed.days:
        through = f" through {code.name}" if code.borrow_max_days is not None and code.borrow_max_days < (
            item.borrow_max_days or 0) else ""
        return f"borrowDays {days} is over the {allowed.days} days item {item.item_id} may be borrowed{through}"
    return None


def borrowed_until(item: Item, days: int, now: datetime) -> datetime:
    """When a borrow of `days` days made now ends: never past the item's expiry (or its grace end once in it)."""
    cap = item.expires_at if now < item.expires_at else item.expires_at + EXPIRY_GRACE
    return min(now + timedelta(days=days), cap)


def still_borrowed(until: datetime | None, now: datetime) -> datetime | None:
    """A seat's borrow end while it runs, else None."""
    return until if until is not None and until > now else None
