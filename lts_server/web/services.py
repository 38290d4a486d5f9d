"""What the HTTP handlers reach: the parts of a running server."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from lts_server.alerts import Alerter
from lts_server.archive import Archiver
from lts_server.clock import ClockGuard
from lts_server.config import Config
from lts_server.identity import Identity
from lts_server.importer import Importer
from lts_server.ledger import Ledger
from lts_server.metrics import Metrics
from lts_server.signer import BatchSigner
from lts_server.store import Store


@dataclass
class Services:
    config: Config
    identity: Identity
    store: Store
    ledger: Ledger
    importer: Importer
    signer: BatchSigner
    alerts: Alerter
    metrics: Metrics
    archiver: Archiver
    started: float = field(default_factory=time.monotonic)
    # A standby whose main server is up does not serve devices.
    main_is_up: bool = False
    # On a cluster (PostgreSQL): take in what the other nodes committed; True once nothing is left.
    catch_up: Callable[[], Awaitable[bool]] | None = None
    # The clock against the server's records (lts_server/clock.py); None: not watched (tests of parts).
    clock: ClockGuard | None = None


SERVICES = web.AppKey("services", Services)
