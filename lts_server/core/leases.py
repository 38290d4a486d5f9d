"""Seat leases (PostgreSQL cluster): when an item is hot on a node, how many seats the node leases at
once, and which leases it no longer needs. Pure: the caller passes the time in (seconds, monotonic).

A node that grants many seats on one item would otherwise update that item's row once per grant,
and every node's grants on the item would queue on the row's lock until each commit's flush. With a
lease the node takes a block of free seats in one update of the row and grants from the block with
writes to its own lease row only. The database checks every step (store/sql_leases.py); this
module only sizes the requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# An item is hot on a node that claimed at least this many of its seats over the last window.
HOT_CLAIMS = 16
# A block holds about this share of the last window's claims: a lease lasts ~1/8 s under steady load,
# so a node updates a hot item's row a few times a second rather than once per grant.
BLOCK_SHARE = 8
MIN_BLOCK = 4
WINDOW = 1.0  # seconds


def block_size(recent_claims: int, most: int) -> int:
    """Seats to lease along with a claim that finds the node's lease empty; 0 for an item that is not hot."""
    if most <= 0 or recent_claims < HOT_CLAIMS:
        return 0
    return min(most, max(MIN_BLOCK, recent_claims // BLOCK_SHARE))


def timings(lease_ms: int) -> tuple[float, float, float]:
    """(renew every, registration lasts, idle after) in seconds, for a node whose leases must come back
    within lease_ms of its death: a registration lasts lease_ms / 2 and is renewed every lease_ms / 4
    (one late renewal is survived); every node sweeps dead ones every lease_ms / 4, so a dead node's
    seats are back at most 3/4 lease_ms after its last renewal. A lease unused for a renewal period
    (at most one second) goes back at the next renewal."""
    quarter = lease_ms / 4000
    return quarter, lease_ms / 2000, min(1.0, quarter)


@dataclass
class ClaimRate:
    """Claims per item over the last WINDOW seconds (two half-windows), and when each was last claimed."""

    _started: float = 0.0
    _current: dict[str, int] = field(default_factory=dict)
    _previous: dict[str, int] = field(default_factory=dict)
    _last: dict[str, float] = field(default_factory=dict)

    def _roll(self, now: float) -> None:
        if now - self._started >= WINDOW:  # both halves are old
            self._previous, self._current, self._started = {}, {}, now
        elif now - self._started >= WINDOW / 2:
            self._previous, self._current, self._started = self._current, {}, self._started + WINDOW / 2

    def add(self, items: Iterable[str], now: float) -> None:
        self._roll(now)
        for item in items:
            self._current[item] = self._current.get(item, 0) + 1
            self._last[item] = now

    def recent(self, item: str, now: float) -> int:
        """Claims on the item in the last half to whole window."""
        self._roll(now)
        return self._current.get(item, 0) + self._previous.get(item, 0)

    def busy(self, now: float, idle: float) -> list[str]:
        """Items claimed within the last `idle` seconds (their leases are kept); forgets the others."""
        for item in [i for i, at in self._last.items() if now - at > idle]:
            del self._last[item]
        return sorted(self._last)
