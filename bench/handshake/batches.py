"""The write batches the store benches commit: a handshake's rows, as the ledger makes them, for many devices.

Each device's grant (or refresh) on one item of one code: the seat change, its seat event, the
authorization and the handshake event.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from lts_server.store import AuthorizationRecord, Event, Seat, WriteBatch

ITEM = "BENCH-1"
CODE = "216998-BENCH"
QUANTITY = 50_000_000  # room for every device a bench makes
# The item's row (qmark parameters: the item and its quantity), of a license 'L-BENCH' of organization 216998.
ITEM_ROW = ("INSERT INTO items (item_id, license_id, organization_id, product, edition, deployment_type,"
            " license_type, quantity, period, domain, starts_at, expires_at) VALUES (?, 'L-BENCH', '216998',"
            " 'barcode-reader', NULL, 'browser', 'per-device', ?, 'yearly', NULL, '2020-01-01T00:00:00Z',"
            " '2030-01-01T00:00:00Z')")


def grants(at: datetime, clients: Iterable[str], refresh: bool = False, leasable: bool = False) -> WriteBatch:
    """One batch: each of `clients` granted a seat (or, with `refresh`, refreshing the one it holds) at `at`.
    `leasable`: the claims may take their seats from the node's lease, as a cluster node's claims on an item
    without reservations or caps do."""
    b = WriteBatch(at=at)
    for job, client in enumerate(clients):
        b.begin_job(job)
        seat = Seat(ITEM, client, at, at, at + timedelta(days=365), code=CODE)
        if refresh:
            b.refresh(seat)
        else:
            b.claim(seat, QUANTITY, leasable=leasable)
        b.events.append(Event(at=at, type="seat.refreshed" if refresh else "seat.granted", code=CODE, item_id=ITEM,
                              client_uuid=client, detail={"expiresAt": seat.expires_at.isoformat()}))
        b.authorizations.append(AuthorizationRecord(CODE, client, ITEM, 1, at, at + timedelta(days=365)))
        b.events.append(Event(at=at, type="handshake", code=CODE, item_id=ITEM, client_uuid=client,
                              product="barcode-reader", deployment_type="browser", result=0))
    return b
