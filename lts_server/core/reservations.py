"""Seat reservations and caps per handshake code: the arithmetic (pure).

On a code, per item: `reservedSeats` (seats only this code may take) and `maxSeats` (the most it
ever holds). The rule, for an item of limit L (quantity + grace) holding U seats:

- the reservations of all codes on an item add up to at most its quantity (not its grace);
- a code with reserved seats it does not hold yet takes one whenever U < L: the seat is its own;
- any other claim must leave the other codes' unused reservations free: U + unused < L;
- a code at its maxSeats takes no seat, reserved or not; grace seats are shared, never reserved.

So the other codes see the item as smaller by the unused reservations, and within the quantity
a reserved seat is always there: U + unused <= L holds after every claim and release (a release
of a reserved seat gives it back to its code). A reservation raised while the item is full takes
effect as seats free: until then the other codes get none. Concurrent and quota items have no
seats to reserve (their overuse tolerance and units are shared by all codes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from lts_server.core.model import Counts, HandshakeCode, Item, SeatLimit

# A cap is stored as an INTEGER (code_item_limits.max_seats): PostgreSQL's holds at most this.
MAX_CAP = 2**31 - 1


@dataclass(frozen=True)
class Share:
    """What one code may take of one item beyond the raw counter."""

    reserved_left: int = 0  # this code's reserved seats it does not hold yet
    others_reserved: int = 0  # the other codes' unused reserved seats: held back from this code
    cap_left: int | None = None  # seats this code may still take under its maxSeats; None: no cap
    waiting: int = 0  # requests queued for the item, ahead of a request that does not wait


FREE = Share()


class ClaimKind(Enum):
    RESERVED = "reserved"  # one of the code's reserved seats
    SHARED = "shared"  # a seat of the pool everyone shares


def unused(reserved: int, used: int) -> int:
    return max(0, reserved - used)


def claim_kind(seats_used: int, limit: int, share: Share) -> ClaimKind | None:
    """How a claim by a code with this share takes a seat, or None when it may not."""
    if share.cap_left is not None and share.cap_left <= 0:
        return None
    if share.reserved_left > 0:
        return ClaimKind.RESERVED if seats_used < limit else None
    if seats_used + share.others_reserved + share.waiting < limit:
        return ClaimKind.SHARED
    return None


def no_room(item: Item, code: HandshakeCode, seats_used: int, limit: int, share: Share) -> str:
    """Why a claim was refused, for the person reading the error."""
    if share.cap_left is not None and share.cap_left <= 0:
        held = code.seat_limit(item.item_id)
        cap = held.max_seats if held else 0
        return f"handshake code {code.name} holds its maximum of {cap} seats of item {item.item_id} (maxSeats)"
    grace = " and the grace" if limit > item.quantity else ""
    if seats_used >= limit:
        return f"all {item.quantity} seats of item {item.item_id}{grace} are taken"
    held_back = []
    if share.others_reserved:
        held_back.append(f"{share.others_reserved} reserved for other handshake codes")
    if share.waiting:
        held_back.append(f"{share.waiting} for devices waiting in the queue")
    return (f"{seats_used} of the {limit} seats of item {item.item_id} are taken and the others are held: "
            + ", ".join(held_back))


def share_of(code: HandshakeCode, item_id: str, limits_on_item: Mapping[str, SeatLimit],
             held: Mapping[str, int], waiting: int = 0) -> Share:
    """A code's share of an item, from every code's limits on it (code name -> limit) and the seats each holds."""
    own = limits_on_item.get(code.name)
    others = sum(unused(lim.reserved_seats, held.get(name, 0)) for name, lim in limits_on_item.items()
                 if name != code.name)
    if own is None:
        return Share(0, others, None, waiting)
    used = held.get(code.name, 0)
    cap = None if own.max_seats is None else own.max_seats - used
    return Share(unused(own.reserved_seats, used), others, cap, waiting)


def total_unused(limits_on_item: Mapping[str, SeatLimit], held: Mapping[str, int]) -> int:
    return sum(unused(lim.reserved_seats, held.get(name, 0)) for name, lim in limits_on_item.items())


def limit_problems(code: HandshakeCode, items: Mapping[str, Item], other_codes: Iterable[HandshakeCode],
                   before: Iterable[SeatLimit] = ()) -> list[tuple[str, str]]:
    """What is wrong with a code's seat limits: (field, message), `itemLimits.<item>.<key>` fields.

    `before`: the code's limits before an edit. The reservations' sum is checked for a reservation the
    edit raises or adds only: a renewal with fewer seats can leave the sum over the quantity, and the code
    must stay editable (and its reservation lowerable) meanwhile."""
    found: list[tuple[str, str]] = []
    others = [c for c in other_codes if c.name != code.name]
    had = {lim.item_id: lim.reserved_seats for lim in before}
    for lim in code.seat_limits:
        at = f"itemLimits.{lim.item_id}"
        item = items.get(lim.item_id)
        if lim.item_id not in code.items or item is None:
            found.append((at, f"item {lim.item_id} is not among the items of {code.name}"))
            continue
        if item.rules.counts is not Counts.SEATS:
            found.append((at, f"item {lim.item_id} is {item.license_type.value}: reservedSeats and maxSeats "
                              "apply to per-device and per-server items (seats)"))
            continue
        if lim.reserved_seats < 0:
            found.append((f"{at}.reservedSeats", "must be 0 or more"))
        if lim.max_seats is not None and lim.max_seats < 1:
            found.append((f"{at}.maxSeats", "must be 1 or more (leave it out for no cap)"))
        if lim.max_seats is not None and lim.max_seats > MAX_CAP:
            found.append((f"{at}.maxSeats", f"must be at most {MAX_CAP:,} (leave it out for no cap)"))
        if lim.max_seats is not None and lim.max_seats < lim.reserved_seats:
            found.append((f"{at}.maxSeats", f"{lim.max_seats} is below reservedSeats {lim.reserved_seats}"))
        if lim.reserved_seats > had.get(lim.item_id, 0):
            shares = [(c.name, held.reserved_seats) for c in others
                      if (held := c.seat_limit(lim.item_id)) is not None and held.reserved_seats]
            total = lim.reserved_seats + sum(n for _, n in shares)
            if total > item.quantity:
                parts = ", ".join(f"{name} {n}" for name, n in [(code.name, lim.reserved_seats), *shares])
                found.append((f"{at}.reservedSeats",
                              f"reservations on item {lim.item_id} would total {total} seats, more than its "
                              f"quantity of {item.quantity} ({parts})"))
    return found


def over_quantity(item: Item, limits_on_item: Mapping[str, SeatLimit]) -> str | None:
    """What the admin must hear when an item's reservations add up to more than its quantity (a renewal
    with fewer seats): they are honoured only as seats free, first come first served."""
    total = sum(lim.reserved_seats for lim in limits_on_item.values())
    if total <= item.quantity:
        return None
    return (f"reservations on item {item.item_id} total {total} seats, more than its quantity of {item.quantity} "
            "(a renewal with fewer seats?): they are honoured only as seats free; lower them "
            f"(ltsctl codes edit CODE --reserve {item.item_id}=N)")


def limits_by_item(codes: Iterable[HandshakeCode]) -> dict[str, dict[str, SeatLimit]]:
    """item -> code name -> limit, for the codes that set any."""
    index: dict[str, dict[str, SeatLimit]] = {}
    for code in codes:
        for lim in code.seat_limits:
            index.setdefault(lim.item_id, {})[code.name] = lim
    return index
