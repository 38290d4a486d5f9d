"""An item's state at a glance (pure): the one word the API, ltsctl and the portal all show.

One state per item, the most pressing first: a device's next handshake is
refused when the item is expired (past its 7-day grace), revoked, over quota
(seats or units and their grace used up) or not yet started; overused items
grant only their quantity; "in grace" works but is living on the allowance
(past expiry, or past the quantity of seats or units).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from lts_server.core.model import CONCURRENT_TOLERANCE_FACTOR, EXPIRY_GRACE, Counts, Item, ItemStatus, hard_limit


class ItemState(StrEnum):
    EXPIRED = "expired"
    REVOKED = "revoked"
    OVER_QUOTA = "over-quota"
    OVERUSED = "overused"
    IN_GRACE = "in-grace"
    NOT_STARTED = "not-started"
    ACTIVE = "active"

    @property
    def label(self) -> str:
        """For people: 'in grace', 'not yet started', ..."""
        return {"in-grace": "in grace", "not-started": "not yet started", "over-quota": "over quota"}.get(
            self.value, self.value)

    @property
    def problem(self) -> bool:
        return self is not ItemState.ACTIVE


# Problems first: what refuses devices now, then what will, then the rest.
SEVERITY = {s: i for i, s in enumerate(ItemState)}


@dataclass(frozen=True)
class StateView:
    state: ItemState
    detail: str  # why, in one phrase


def item_state(item: Item, status: ItemStatus, now: datetime) -> StateView:
    day = f"{item.expires_at:%Y-%m-%d}"
    if now >= item.expires_at + EXPIRY_GRACE:
        return StateView(ItemState.EXPIRED, f"expired on {day}; the 7-day grace is over")
    if status.revoked:
        return StateView(ItemState.REVOKED, "revoked by the admin")
    counts = item.rules.counts
    limit = hard_limit(item.license_type, item.quantity)
    if counts is Counts.SEATS and status.seats_used >= limit:
        grace = " and the grace" if limit > item.quantity else ""
        return StateView(ItemState.OVER_QUOTA, f"{status.seats_used:,} of {item.quantity:,} seats{grace} used: "
                                               "new devices are refused")
    if counts is Counts.UNITS and status.units_used >= limit:
        return StateView(ItemState.OVER_QUOTA, f"{status.units_used:,} of {item.quantity:,} units and the grace "
                                               "used: every device is refused")
    if counts in (Counts.CONCURRENCY, Counts.INSTANCES) and (
            status.overused or status.overuse_used >= CONCURRENT_TOLERANCE_FACTOR * item.quantity):
        return StateView(ItemState.OVERUSED, f"overuse allowance used up: only {item.quantity:,} are granted")
    if now >= item.expires_at:
        return StateView(ItemState.IN_GRACE, f"expired on {day}; refused after {item.expires_at + EXPIRY_GRACE:%Y-%m-%d}")
    if counts is Counts.SEATS and status.seats_used > item.quantity:
        return StateView(ItemState.IN_GRACE, f"{status.seats_used:,} of {item.quantity:,} seats: using the grace "
                                             f"of {limit - item.quantity:,}")
    if counts is Counts.UNITS and status.units_used > item.quantity:
        return StateView(ItemState.IN_GRACE, f"{status.units_used:,} of {item.quantity:,} units: using the grace "
                                             f"of {limit - item.quantity:,}")
    if now < item.starts_at:
        return StateView(ItemState.NOT_STARTED, f"starts on {item.starts_at:%Y-%m-%d}")
    return StateView(ItemState.ACTIVE, "")
