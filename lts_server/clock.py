"""The server's clock against its own records: a clock set back grants nothing and extends nothing.

The server keeps the latest time it has durably recorded (`clock_state.latest_ms`, written every
TICK_SECONDS by each process, and raised in memory by every grant it commits). If the clock reads
more than `[clock] tolerance` seconds before that, the server is behind its records: handshakes and
usage reports get 503 with code 160 ("server clock is behind its records"), the log says so once
(then at most every 10 s), and an alert goes out. It serves again as soon as the clock catches up,
or when the admin accepts the clock as it is (`ltsctl clock accept`, an event in the usage chain).

Accepting never gives back time: the records' latest time becomes the floor (`floor_ms`), and
time-limited items (their start, expiry and 7-day grace) and lapsing seats are judged at the later
of the clock and that floor (`judged`) until the clock passes it. So setting the clock back a year
and accepting it does not bring an expired item back; the vendor also sees the acceptance, with how
far the clock was behind, in the next usage statement.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from lts_server import logs
from lts_server.core.times import from_ms, iso, to_ms
from lts_server.store.sql_trust import ClockRow

TICK_SECONDS = 5.0


@dataclass(frozen=True)
class ClockStatus:
    now: datetime
    latest: datetime | None  # the latest time recorded (None: nothing recorded yet)
    floor: datetime | None  # time-limited items are not judged before this
    behind: timedelta | None  # how far the clock is behind the records, past the tolerance; None: it is not
    accepted: datetime | None  # when the admin last accepted the clock

    def to_json(self) -> dict[str, object]:
        return {"now": iso(self.now), "latestRecorded": iso(self.latest) if self.latest else None,
                "floor": iso(self.floor) if self.floor else None, "behind": self.behind is not None,
                "behindSeconds": round(self.behind.total_seconds(), 3) if self.behind else 0,
                "acceptedAt": iso(self.accepted) if self.accepted else None}


class ClockGuard:
    def __init__(self, clock: Callable[[], datetime], tolerance: timedelta) -> None:
        self.clock = clock
        self.tolerance = tolerance
        self._latest_ms = 0
        self._floor_ms = 0
        self._accepted_ms: int | None = None
        self._was_behind = False
        # Told when the clock falls behind its records (the alert), with the status then.
        self.on_behind: Callable[[ClockStatus], None] | None = None

    def load(self, row: ClockRow) -> None:
        """Take in the stored state (start-up, a tick, or another node's acceptance)."""
        if row.accepted_ms != self._accepted_ms:  # accepted (here or on another node): the records start over
            self._latest_ms = row.latest_ms
        else:
            self._latest_ms = max(self._latest_ms, row.latest_ms)
        self._floor_ms = row.floor_ms
        self._accepted_ms = row.accepted_ms
        self.check()

    def recorded(self, at: datetime) -> None:
        """A time the server just made durable (a committed grant)."""
        self._latest_ms = max(self._latest_ms, to_ms(at))

    def behind(self, now: datetime | None = None) -> timedelta | None:
        """How far the clock is behind the latest time recorded, when by more than the tolerance."""
        now = now or self.clock()
        gap = self._latest_ms - to_ms(now)
        return timedelta(milliseconds=gap) if gap > self.tolerance.total_seconds() * 1000 else None

    def judged(self, now: datetime) -> datetime:
        """The time time-limited items and seats are judged at: never before what the records have seen."""
        floor = max(self._floor_ms, self._latest_ms)
        return now if to_ms(now) >= floor else from_ms(floor)

    def floor(self) -> datetime | None:
        floor = max(self._floor_ms, self._latest_ms)
        return from_ms(floor) if floor else None

    def status(self) -> ClockStatus:
        now = self.clock()
        return ClockStatus(now, from_ms(self._latest_ms) if self._latest_ms else None,
                           from_ms(self._floor_ms) if self._floor_ms else None, self.behind(now),
                           from_ms(self._accepted_ms) if self._accepted_ms else None)

    def check(self) -> ClockStatus:
        """Log (and alert) when the clock falls behind its records, and when it is fine again."""
        status = self.status()
        if status.behind is not None and not self._was_behind:
            logs.event("clock.behind", logs.logging.ERROR, now=iso(status.now),
                       latest_recorded=iso(status.latest) if status.latest else None,
                       behind_seconds=round(status.behind.total_seconds()),
                       hint="fix the clock (NTP), or accept it with `ltsctl clock accept`: until then nothing is granted")
            if self.on_behind is not None:
                self.on_behind(status)
        elif status.behind is None and self._was_behind:
            logs.event("clock.serving", now=iso(status.now))
        self._was_behind = status.behind is not None
        return status

    def tick_ms(self) -> int:
        """What a tick records: the clock, or a later time this process already made durable (a grant)."""
        return max(to_ms(self.clock()), self._latest_ms)

    async def run(self, tick: Callable[[int], object], stopping: asyncio.Event) -> None:
        """Record the clock every TICK_SECONDS (`tick` stores it and returns the stored row)."""
        while not stopping.is_set():
            try:
                row = await tick(self.tick_ms())  # type: ignore[misc]
                self.load(row)
            except Exception as e:  # the database is away: the last state holds, the next tick tries again
                logs.event_limited("clock.tick_failed", logs.logging.ERROR, error=str(e))
            try:
                await asyncio.wait_for(stopping.wait(), timeout=TICK_SECONDS)
            except TimeoutError:
                pass
