"""Seat leases of a PostgreSQL cluster (issue 24), as procedures every store runs (see store/sql.py).

A node that grants many seats of one item takes a block of the item's free seats in one conditional
update of the item's row (`items.seats_used` counts leased seats as taken) and grants from the block
by decrementing its own row of `seat_leases`; so its claims do not all queue on the item's row lock
until their commit. The rows decide, as for any claim: a block is taken only when the item has room
for all of it besides other codes' unused reserved seats, and a node whose lease is empty claims
through the item's row, or - when that row is full - takes a seat another node leased, so every seat
of the item is granted before any claim is refused.

Only claims the ledger marks `leasable` use leases: on items no code reserves or caps seats of, with
no request waiting in the seat queue (docs/design.md, "Seat leases"). Locks: a lease row before its
item's row, in every procedure that takes both (claims here, returns here and in lts_server/leases.py).
A renewal or a code's new reservation gives the item's leases back in its own transaction
(`return_leases`), and no lease seat is granted while the item's row is over the claim's limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lts_server.store import SeatChange, sql


# A lease's seat is granted only while the item's row is within the claim's limit: true whenever the limit
# stays what it was when the block was taken (blocks are taken within it), false once a renewal lowered it
# below the seats taken (held + leased) - then the claim goes through the row, which counts exactly.
WITHIN_LIMIT = "(SELECT seats_used FROM items WHERE item_id = ?) <= ?"


@dataclass(frozen=True)
class Leasing:
    """What a batch's claims may lease: this node's number, the seats to lease along with a claim on an
    item whose lease is empty (hot items only), and the items this node may hold a lease on."""

    node: int
    blocks: dict[str, int] = field(default_factory=dict)
    held: frozenset[str] = frozenset()


def claim(change: SeatChange, leasing: Leasing) -> sql.Procedure[int]:
    """Count a leasable claim: from this node's lease, else with a new block, else through the item's
    row; 1 when counted."""
    s = change.seat
    block = leasing.blocks.get(s.item_id, 0)
    if s.item_id in leasing.held or block:
        taken = yield sql.Exec(f"UPDATE seat_leases SET seats = seats - 1 WHERE item_id = ? AND node = ? AND seats > 0"
                               f" AND {WITHIN_LIMIT}", (s.item_id, leasing.node, s.item_id, change.limit))
        if taken == 1:
            return 1
    if block:
        # The lease row first (locked by the upsert), then the item's: the order of every return.
        yield sql.Exec("INSERT INTO seat_leases (item_id, node, seats) VALUES (?, ?, 0)"
                   " ON CONFLICT (item_id, node) DO UPDATE SET seats = seat_leases.seats", (s.item_id, leasing.node))
        took = yield sql.Exec("UPDATE items SET seats_used = seats_used + 1 + ?"
                          " WHERE item_id = ? AND seats_used + seats_reserved_unused + 1 + ? <= ?",
                          (block, s.item_id, block, change.limit))
        if took == 1:
            yield sql.Exec("UPDATE seat_leases SET seats = seats + ? WHERE item_id = ? AND node = ?",
                       (block, s.item_id, leasing.node))
            return 1
    return (yield sql.Exec("UPDATE items SET seats_used = seats_used + 1"
                       " WHERE item_id = ? AND seats_used + seats_reserved_unused < ?", (s.item_id, change.limit)))


def take_leased(item_id: str, limit: int) -> sql.Procedure[int]:
    """The item's row is full: one seat another node leased and has not granted (1), if any."""
    return (yield sql.Exec("UPDATE seat_leases SET seats = seats - 1 WHERE item_id = ? AND seats > 0 AND node ="
                           " (SELECT node FROM seat_leases WHERE item_id = ? AND seats > 0 ORDER BY seats DESC LIMIT 1)"
                           f" AND {WITHIN_LIMIT}", (item_id, item_id, item_id, limit)))


def return_leases(item_ids: list[str]) -> sql.Procedure[None]:
    """Every node's leased seats of these items back on the items (their quantity or reservations are about
    to change): leases were taken within the old limits, and a seat of one must not be granted past the
    new ones. The lease rows go first, then the items' rows (the order of every procedure here)."""
    if not item_ids:
        return
    marks = ",".join("?" * len(item_ids))
    returned = yield sql.Query(f"DELETE FROM seat_leases WHERE item_id IN ({marks}) AND seats > 0"
                               " RETURNING item_id, seats", tuple(item_ids))
    back: dict[str, int] = {}
    for item_id, seats in returned:
        back[item_id] = back.get(item_id, 0) + seats
    if back:
        yield sql.Many("UPDATE items SET seats_used = seats_used - ? WHERE item_id = ?",
                       [(seats, item_id) for item_id, seats in sorted(back.items())])
