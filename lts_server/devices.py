"""The devices the ledger holds in memory: a bounded cache in front of the database.

A licensee with a public web app can hold millions of seats, one per browser.
Holding every seat and authorization in memory cost about 1.2 KB per device
and a start-up that read them all; so the database holds every device, and
memory holds the devices in use: the ones a job is deciding about (pinned, so
never evicted while their changes may be uncommitted) and the most recently
used, up to `capacity`. The counters per item stay in memory (in the ledger),
so deciding needs only the asking device's rows.

Why this is exact: a device's rows change only through jobs that pin it first,
and a pin is released only after the job's batch committed or was undone. So a
device that is not in memory has no change in flight, and the database holds
its truth; loading it reads the committed rows. Concurrent loads of one device
share one read, and misses that arrive in the same event-loop turn share one
query (`IN (...)`), so a burst of new devices costs one trip to the database
thread, not one each.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field

from lts_server.store import AuthorizationRecord, Seat

Lookup = Callable[[set[str]], Awaitable[tuple[list[Seat], list[AuthorizationRecord], dict[str, str]]]]


@dataclass
class Device:
    """One device's rows: its seats by item, its latest authorization by code, the fingerprint it is bound to."""

    seats: dict[str, Seat] = field(default_factory=dict)
    authorizations: dict[str, AuthorizationRecord] = field(default_factory=dict)
    fingerprint: str | None = None


class DeviceCache:
    def __init__(self, lookup: Lookup, capacity: int) -> None:
        self._lookup = lookup
        self.capacity = capacity
        self._entries: OrderedDict[str, Device] = OrderedDict()  # least recently used first
        self._pins: dict[str, int] = {}
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._wanted: set[str] = set()  # misses waiting for the next lookup
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, client_uuid: str) -> bool:
        return client_uuid in self._entries

    def items(self) -> list[tuple[str, Device]]:
        """Every device in memory (a snapshot of the list)."""
        return list(self._entries.items())

    def get(self, client_uuid: str) -> Device | None:
        return self._entries.get(client_uuid)

    def __getitem__(self, client_uuid: str) -> Device:
        """A device a job pinned (a KeyError here is a job touching a device it did not pin)."""
        return self._entries[client_uuid]

    async def pin(self, clients: Collection[str]) -> None:
        """Load the devices and keep them in memory until `unpin`."""
        for c in clients:
            self._pins[c] = self._pins.get(c, 0) + 1
        try:
            await self.load(clients)
        except BaseException:
            self.unpin(clients)
            raise

    def hold(self, clients: Iterable[str]) -> None:
        """Pin devices already in memory (pinned by the running job), without a load: synchronous."""
        for c in clients:
            assert c in self._entries, c
            self._pins[c] = self._pins.get(c, 0) + 1

    def unpin(self, clients: Iterable[str]) -> None:
        for c in clients:
            left = self._pins[c] - 1
            if left:
                self._pins[c] = left
            else:
                del self._pins[c]
        self._evict()

    async def load(self, clients: Collection[str]) -> None:
        """Make sure the devices are in memory (recently used; evictable unless pinned)."""
        waits = []
        for c in clients:
            if c in self._entries:
                self.hits += 1
                self._entries.move_to_end(c)
                continue
            future = self._loading.get(c)
            if future is None:
                self.misses += 1
                future = asyncio.get_running_loop().create_future()
                self._loading[c] = future
                if not self._wanted:
                    asyncio.get_running_loop().call_soon(self._flush)
                self._wanted.add(c)
            waits.append(future)
        if waits:
            await asyncio.gather(*waits)

    def put(self, client_uuid: str, device: Device) -> None:
        """Replace a cached device's rows with rows read from the database (another node changed them)."""
        if client_uuid in self._entries:
            self._entries[client_uuid] = device

    def _flush(self) -> None:
        wanted, self._wanted = self._wanted, set()
        task = asyncio.ensure_future(self._lookup(wanted))
        task.add_done_callback(lambda t: self._loaded(t, wanted))

    def _loaded(self, task: asyncio.Future[tuple[list[Seat], list[AuthorizationRecord], dict[str, str]]],
                wanted: set[str]) -> None:
        error = task.exception() if not task.cancelled() else asyncio.CancelledError()
        if error is None:
            seats, auths, bound = task.result()
            found: dict[str, Device] = {c: Device(fingerprint=bound.get(c)) for c in wanted}
            for seat in seats:
                found[seat.client_uuid].seats[seat.item_id] = seat
            for auth in auths:
                found[auth.client_uuid].authorizations[auth.code] = auth
            for c, device in found.items():
                self._entries.setdefault(c, device)
        for c in wanted:
            future = self._loading.pop(c)
            if future.done():  # cancelled: every job that waited for it went away (a stop)
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(None)
        self._evict()

    def _evict(self) -> None:
        excess = len(self._entries) - self.capacity
        if excess <= 0:
            return
        victims = []
        for c in self._entries:
            if c not in self._pins:
                victims.append(c)
                if len(victims) == excess:
                    break
        for c in victims:
            del self._entries[c]
