"""Which server to ask first: the client's memory of servers that failed lately.

A server that failed (no answer within the timeout, a refused connection, a 5xx, a standby that
will not serve) is asked after the others for a while: 2 seconds after one failure, doubling with
each failure in a row up to 5 minutes. A server that answers is forgotten at once. Servers are
never skipped: when every server is backed off, all are still tried, the one whose back-off ends
first before the others. So a hung first server (accepting connections, never answering) costs
one timeout, not one per call; and a recovered one is back in front after its back-off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

FIRST_BACKOFF = 2.0
MAX_BACKOFF = 300.0


@dataclass
class _Failing:
    failures: int
    until: float  # the clock's time when the server goes back to its place in the list


class Failover:
    """The order to try servers in, from their place in the list and their recent failures."""

    def __init__(self, servers: list[str], clock: Callable[[], float] = time.monotonic,
                 first_backoff: float = FIRST_BACKOFF, max_backoff: float = MAX_BACKOFF) -> None:
        self.servers = list(servers)
        self.clock = clock
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self._failing: dict[str, _Failing] = {}

    def order(self) -> list[str]:
        """Every server: those not backed off in list order, then the backed-off ones, soonest back first."""
        now = self.clock()
        ready = [s for s in self.servers if s not in self._failing or self._failing[s].until <= now]
        waiting = sorted((s for s in self.servers if s not in ready), key=lambda s: self._failing[s].until)
        return ready + waiting

    def failed(self, server: str) -> None:
        failures = self._failing[server].failures + 1 if server in self._failing else 1
        backoff = min(self.max_backoff, self.first_backoff * 2 ** (failures - 1))
        self._failing[server] = _Failing(failures, self.clock() + backoff)

    def answered(self, server: str) -> None:
        self._failing.pop(server, None)

    def backoff(self, server: str) -> float:
        """Seconds until the server is back in its place (0 when it is there)."""
        failing = self._failing.get(server)
        return max(0.0, failing.until - self.clock()) if failing else 0.0
