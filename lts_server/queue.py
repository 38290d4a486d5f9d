"""Seat queues: a handshake with `waitSeconds` that finds no free seat waits its turn, first in first out.

The queue's state changes only inside the ledger's writer (a join is part of the handshake job that
found no seat; a grant to a waiter is part of the job that freed the seat), so its order is the
writer's order and a seat that frees goes to the head of the queue in the same commit: a request
that does not wait never takes a seat a waiter is due (the ledger holds the waiters' seats back
from it, core/reservations.py `Share.waiting`).

Each item has one order, by ticket. On SQLite the tickets count up in this process; on a PostgreSQL
cluster they come from one database sequence, so the order is cluster-wide: every node knows the
other nodes' waiters (rows in `seat_queue`, changes told with NOTIFY, store/pg_queue.py) and
serves its own only when one of them is the first that may take the free seat.

This module holds the data (`SeatQueue`, `Waiter`) and the waiting itself (`wait`): a request
returns with its grant, with the usual refusal and its position when its time runs out, or 503
when the server stops; a client that disconnects leaves the queue.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class State(Enum):
    QUEUED = "queued"
    SERVING = "serving"  # decided in a batch whose commit is under way: its outcome is coming
    DONE = "done"  # left the queue (granted, refused, gave up, or the server stopped)


@dataclass(eq=False)
class Waiter:
    """One waiting request: a local one (req, future) or, on a cluster, another node's (remote)."""

    ticket: int
    code: str
    items: tuple[str, ...]  # the items it waits for (those that refused it for want of a seat)
    expires: float  # time.monotonic() when it stops waiting (remote: its deadline as this node sees it)
    req: Any = None  # core.handshake.Request
    refusal: Any = None  # the refusal it would have had, answered if its time runs out
    item_id: str | None = None  # the item that refusal names, for the position
    future: asyncio.Future[Any] | None = None
    node: str | None = None  # set for another node's waiter
    state: State = State.QUEUED
    connected: Callable[[], bool] | None = None  # whether its client is still there (local waiters)
    fingerprint: str | None = None  # the SHA-256 of its deviceFingerprint (local waiters), bound at its grant

    @property
    def remote(self) -> bool:
        return self.future is None

    @property
    def live(self) -> bool:
        return self.state is State.QUEUED


@dataclass
class _ItemQueue:
    waiters: list[Waiter] = field(default_factory=list)  # by ticket; finished ones are dropped lazily
    codes: Counter[str] = field(default_factory=Counter)  # live waiters per code

    @property
    def live(self) -> int:
        return sum(self.codes.values())


def _ticket(w: Waiter) -> int:
    return w.ticket


class SeatQueue:
    def __init__(self, max_waiting: int = 10_000) -> None:
        self.max_waiting = max_waiting
        self._items: dict[str, _ItemQueue] = {}
        self._local_tickets = itertools.count(1)
        self.remote: dict[int, Waiter] = {}  # another node's waiters, by ticket
        self.local: dict[int, Waiter] = {}  # this node's live waiters, by ticket

    def next_ticket(self) -> int:
        return next(self._local_tickets)

    def __bool__(self) -> bool:
        return bool(self.local or self.remote)

    def waiting(self, item_id: str) -> int:
        q = self._items.get(item_id)
        return q.live if q else 0

    def lengths(self) -> dict[str, int]:
        """Live waiters per item (the metric and the portal)."""
        return {item_id: n for item_id, q in self._items.items() if (n := q.live)}

    def codes_waiting(self, item_id: str) -> Counter[str]:
        q = self._items.get(item_id)
        return q.codes if q else Counter()

    def items_waited_for(self) -> list[str]:
        return [item_id for item_id, q in self._items.items() if q.live]

    def full(self, item_id: str) -> bool:
        return self.waiting(item_id) >= self.max_waiting

    def add(self, waiter: Waiter) -> None:
        for item_id in waiter.items:
            q = self._items.setdefault(item_id, _ItemQueue())
            if q.waiters and q.waiters[-1].ticket > waiter.ticket:
                bisect.insort(q.waiters, waiter, key=_ticket)
            else:
                q.waiters.append(waiter)
            q.codes[waiter.code] += 1
        (self.remote if waiter.remote else self.local)[waiter.ticket] = waiter

    def remove(self, waiter: Waiter, state: State = State.DONE) -> None:
        """Out of the queue (its list entries go when compacted)."""
        if waiter.state is State.QUEUED:
            for item_id in waiter.items:
                q = self._items[item_id]
                q.codes[waiter.code] -= 1
                if not q.codes[waiter.code]:
                    del q.codes[waiter.code]
        waiter.state = state
        (self.remote if waiter.remote else self.local).pop(waiter.ticket, None)

    def restore(self, waiter: Waiter) -> None:
        """Undo `remove` (its batch did not commit): back in its place, as its entries were never dropped."""
        if waiter.state is State.QUEUED:
            return
        waiter.state = State.QUEUED
        for item_id in waiter.items:
            self._items[item_id].codes[waiter.code] += 1
        (self.remote if waiter.remote else self.local)[waiter.ticket] = waiter

    def in_order(self, item_id: str) -> Iterator[Waiter]:
        q = self._items.get(item_id)
        if q is None:
            return iter(())
        return (w for w in q.waiters if w.live)  # compact() replaces the list, never changes it in place

    def position(self, waiter: Waiter, item_id: str | None = None) -> int:
        """1 for the head: live waiters ahead on the item, plus one."""
        q = self._items.get(item_id or waiter.items[0])
        if q is None:
            return 1
        ahead = 0
        for w in q.waiters:
            if w is waiter or w.ticket >= waiter.ticket:
                break
            ahead += w.live
        return ahead + 1

    def compact(self) -> None:
        """Drop finished waiters from the lists (outside the writer's jobs: an undo may restore one inside)."""
        for item_id in list(self._items):
            q = self._items[item_id]
            if len(q.waiters) > 2 * q.live + 16 or not q.live:
                q.waiters = [w for w in q.waiters if w.state is not State.DONE]
                if not q.waiters:
                    del self._items[item_id]

    def expire_remote(self, now: float) -> bool:
        """Forget other nodes' waiters past their deadline (a node that stopped leaves its rows): True if any."""
        gone = [w for w in self.remote.values() if w.expires <= now]
        for w in gone:
            self.remove(w)
        return bool(gone)


class Stopped(Exception):
    """The server stops: the waiting request gets 503 and retries."""


async def wait(waiter: Waiter, deadline: float, give_up: Callable[[Waiter, bool], Any]) -> Any:
    """The waiter's outcome: granted or refused by the writer, or, when the deadline passes, what
    `give_up(waiter, False)` (a writer job) decides: a last refusal, or the grant that came first. A client
    that disconnects is found by the ledger's once-a-second check (`Ledger.queue_check`), not here: one
    timer per waiter, not one wake-up a second each."""
    assert waiter.future is not None
    try:
        return await asyncio.wait_for(asyncio.shield(waiter.future), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return await give_up(waiter, False)
