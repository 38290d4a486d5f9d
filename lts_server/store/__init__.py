"""Storage behind a narrow interface of intent-revealing operations.

The ledger hands the store a `WriteBatch` (claim these seats, record these
events, import this license...) and the store makes all of it durable in one
transaction or none of it. The licensing rules never see SQL; a PostgreSQL
backend implements the same `Store` protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Generator, Iterable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from enum import Enum
from typing import Any, Protocol

from lts_server.core.model import HandshakeCode, Item, ItemStatus, License, SeatLimit


class StoreError(Exception):
    """The database could not do what was asked; the message says why, for a person."""


class StoreUnavailable(StoreError):
    """Locked by another process, or otherwise temporarily unusable: retry later."""


class StoreUnreachable(StoreUnavailable):
    """The database server cannot be reached (stopped, restarting, the network): retry later."""


class StoreInDoubt(StoreUnreachable):
    """The connection to the database server was lost while a commit was on its way: it may or may not have
    happened. Retrying is safe (a recorded grant comes back as a refresh of the same seat, a recorded usage
    report is known by its id)."""


class StoreFull(StoreError):
    """The disk (or the database's size limit) is full."""


class SchemaTooNew(StoreError):
    """The database was written by a newer lts-server."""


class Conflict(StoreError):
    """A conditional write found the database in another state than the ledger expected.

    `job` is the index, within its batch, of the job whose change conflicted,
    so the ledger can fail that job alone and decide the others again.
    """

    def __init__(self, message: str, job: int | None = None) -> None:
        super().__init__(message)
        self.job = job


class Unstorable(StoreError):
    """The database refused a value as such: text it cannot hold (a NUL, a character its encoding lacks),
    a number out of its range. The request that brought it is at fault, not the database.

    From `write`, `job` is the index of the job whose rows hold the value (the store finds it by
    writing the batch's jobs one by one, `WriteBatch.parts`, in a transaction it rolls back): the
    ledger fails that job alone and writes the batch again without it, so a hostile request never
    costs its neighbours their answers. A store that cannot name the job raises a plain StoreError.
    From a read, `job` is None: the value asked about cannot be in the database.
    """

    def __init__(self, message: str, job: int | None = None) -> None:
        super().__init__(message)
        self.job = job


@dataclass(frozen=True)
class Seat:
    item_id: str
    client_uuid: str
    granted_at: datetime
    refreshed_at: datetime
    expires_at: datetime
    # The code that claimed it (its reservation and cap count it); None for seats older than that.
    code: str | None = None
    # A borrowed seat is held for the offline device until then (core/borrowing.py).
    borrowed_until: datetime | None = None


class SeatOp(Enum):
    CLAIM = "claim"
    REFRESH = "refresh"
    RELEASE = "release"


@dataclass(frozen=True)
class SeatChange:
    """One change to the seat pool. A batch's changes apply in the order the ledger made them,
    so "release one, claim one" on a full item is as valid in the database as it was in memory."""

    op: SeatOp
    seat: Seat
    limit: int = 0  # CLAIM only: the claim fails if the item already holds this many seats
    job: int = 0  # the index of the job in its batch that made the change
    # CLAIM only: the code's other items; the claim fails if the device holds a seat on one of them.
    exclusive_of: tuple[str, ...] = ()
    # The seat's code has seat limits on the item: its count moves too (CLAIM, RELEASE); `reserved`: the
    # claim takes one of the code's reserved seats (core/reservations.py).
    limited: bool = False
    reserved: bool = False
    # CLAIM only, on a cluster: the claim may take a seat of a seat lease (store/sql_leases.py): its item
    # has no code's reservation or cap and no request waiting for it.
    leasable: bool = False


@dataclass(frozen=True)
class BorrowSpan:
    """A borrow the statistics count slice by slice (table borrow_slices): started or extended to `until`,
    or, with `end`, ended at `at` (a return or a release)."""

    item_id: str
    client_uuid: str
    code: str | None
    at: datetime
    until: datetime
    end: bool = False


@dataclass(frozen=True)
class CodeLimits:
    """A code's seat limits as they now are, on the items whose limits changed (none: removed)."""

    code: str
    limits: tuple[SeatLimit, ...]
    items: tuple[str, ...]


@dataclass(frozen=True)
class Holder:
    """One device holding part of an item: a seat (seat-counted items) or a live authorization (the others).

    `kind` says which ("seat", "grant"); a borrowed seat says until when its device holds it offline.
    """

    kind: str
    client_uuid: str
    since: datetime
    last_seen: datetime
    expires_at: datetime
    code: str | None
    borrowed_until: datetime | None = None


@dataclass(frozen=True)
class Event:
    at: datetime
    type: str
    code: str | None = None
    item_id: str | None = None
    client_uuid: str | None = None
    product: str | None = None
    deployment_type: str | None = None
    result: int | None = None
    detail: dict[str, Any] | None = None
    units: int | None = None
    instances: int | None = None


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    event: Event


@dataclass(frozen=True)
class Change:
    """An event another node of a cluster wrote, as far as following it needs: what it names."""

    type: str
    item_id: str | None
    client_uuid: str | None
    report_id: str | None = None  # usage.report: the report counted


@dataclass(frozen=True)
class ImportRecord:
    path: str
    sha256: str
    state: str  # imported | renewed | unchanged | rejected
    seen_at: datetime
    reason: str | None = None
    license_id: str | None = None
    revision: int | None = None


@dataclass(frozen=True)
class LicenseRecord:
    license: License
    key_id: str
    sha256: str
    file_text: str
    first_imported_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class AuthorizationRecord:
    """The latest grant for a device on a code: where its usage is charged."""

    code: str
    client_uuid: str
    item_id: str
    instances: int
    granted_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class UsageReportRecord:
    report_id: str
    client_uuid: str
    code: str
    received_at: datetime


@dataclass(frozen=True)
class RollupRow:
    bucket_ms: int
    granted: int
    refused: int
    units: int
    devices: int
    instances: int


@dataclass(frozen=True)
class RollupResult:
    processed: int
    last_seq: int  # the highest event number the rollups have read past
    # Device- or instance-slices beyond the quantity added per concurrent item.
    overuse: dict[str, int]


@dataclass
class Snapshot:
    """What the ledger loads at start-up: the catalog, and the live authorizations of the items counted
    per time slice (other devices' rows are read when the device asks)."""

    licenses: dict[str, LicenseRecord] = field(default_factory=dict)
    items: dict[str, Item] = field(default_factory=dict)
    statuses: dict[str, ItemStatus] = field(default_factory=dict)
    codes: dict[str, HandshakeCode] = field(default_factory=dict)
    organization_defaults: dict[str, str] = field(default_factory=dict)
    imports: dict[str, ImportRecord] = field(default_factory=dict)
    authorizations: dict[tuple[str, str], AuthorizationRecord] = field(default_factory=dict)
    # (code, item) -> seats the code holds, for the codes with seat limits on the item.
    code_seats: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class WriteBatch:
    """Changes that become durable together, in one transaction."""

    licenses: list[LicenseRecord] = field(default_factory=list)
    codes: list[HandshakeCode] = field(default_factory=list)
    codes_deleted: list[str] = field(default_factory=list)
    organization_defaults: dict[str, str] = field(default_factory=dict)
    seat_changes: list[SeatChange] = field(default_factory=list)
    revocations: dict[str, bool] = field(default_factory=dict)
    imports: list[ImportRecord] = field(default_factory=list)
    authorizations: list[AuthorizationRecord] = field(default_factory=list)
    # (job index, report): a report another writer counted meanwhile fails its job alone.
    usage_reports: list[tuple[int, UsageReportRecord]] = field(default_factory=list)
    unit_charges: dict[str, int] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    # More statements of the batch's transaction (store/sql.py procedures), for tables of their own modules:
    # license bindings, device bindings, the clock, authorizations ended, usage statements.
    extras: list[Callable[[], Generator[Any, Any, None]]] = field(default_factory=list)
    code_limits: list[CodeLimits] = field(default_factory=list)
    borrows: list[BorrowSpan] = field(default_factory=list)
    # When the changes were made: stamps rows that keep a modification time.
    at: datetime | None = None
    # The index of the job now adding changes (set by begin_job), for SeatChange.job.
    job: int = 0
    # Where each job's rows begin: (job, the length of every row list when it began).
    job_starts: list[tuple[int, dict[str, int]]] = field(default_factory=list, repr=False)

    def begin_job(self, job: int) -> None:
        """Rows added from now on are job `job`'s (the ledger calls this before it runs each job)."""
        self.job = job
        self.job_starts.append((job, {name: len(getattr(self, name)) for name in _ROW_LISTS}))

    def parts(self) -> list[tuple[int | None, WriteBatch]]:
        """The batch cut into the rows each job added, in the order they were added, each a batch of its
        own; then (None) what the jobs share: the per-item and per-organization totals, and rows added
        outside any job. Written in this order they make the same changes as the whole batch."""
        bounds = [*self.job_starts, (None, {name: len(getattr(self, name)) for name in _ROW_LISTS})]
        empty = {name: [] for name in _ROW_LISTS}
        found: list[tuple[int | None, WriteBatch]] = []
        for (job, start), (_, end) in zip(bounds, bounds[1:]):
            rows = {name: getattr(self, name)[start[name]:end[name]] for name in _ROW_LISTS}
            found.append((job, replace(self, organization_defaults={}, revocations={}, unit_charges={},
                                       job_starts=[], **rows)))
        first = bounds[0][1]
        before = {name: getattr(self, name)[:first[name]] for name in _ROW_LISTS}
        found.append((None, replace(self, job_starts=[], **{**empty, **before})))
        return [(job, part) for job, part in found if part]

    def claim(self, seat: Seat, limit: int, exclusive_of: tuple[str, ...] = (), limited: bool = False,
              reserved: bool = False, leasable: bool = False) -> None:
        self.seat_changes.append(SeatChange(SeatOp.CLAIM, seat, limit, self.job, exclusive_of, limited, reserved,
                                            leasable))

    def refresh(self, seat: Seat) -> None:
        self.seat_changes.append(SeatChange(SeatOp.REFRESH, seat, job=self.job))

    def release(self, seat: Seat, limited: bool = False) -> None:
        self.seat_changes.append(SeatChange(SeatOp.RELEASE, seat, job=self.job, limited=limited))

    def count_report(self, report: UsageReportRecord) -> None:
        self.usage_reports.append((self.job, report))

    def __bool__(self) -> bool:
        return any(
            (
                self.licenses,
                self.codes,
                self.codes_deleted,
                self.organization_defaults,
                self.seat_changes,
                self.revocations,
                self.imports,
                self.authorizations,
                self.usage_reports,
                self.unit_charges,
                self.events,
                self.extras,
                self.code_limits,
                self.borrows,
            )
        )


# WriteBatch's lists of rows, each row added by one job (the dicts are totals the jobs share).
_ROW_LISTS = tuple(f.name for f in fields(WriteBatch) if f.default_factory is list and f.name != "job_starts")


@dataclass
class Reloaded:
    """The rows behind some items' counters and some devices' seats and authorizations, as stored now."""

    statuses: dict[str, ItemStatus]
    seats: list[Seat]
    authorizations: list[AuthorizationRecord]
    # client uuid -> the fingerprint it is bound to (clone detection)
    bindings: dict[str, str] = field(default_factory=dict)
    # (code, item) -> seats held, for the codes with seat limits on those items.
    code_seats: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass(frozen=True)
class Webhook:
    id: int
    url: str
    secret: str
    created_ms: int


@dataclass(frozen=True)
class AlertSettings:
    recipients: str  # e-mail addresses separated by semicolons
    disabled_kinds: frozenset[str]
    webhooks: tuple[Webhook, ...]


@dataclass(frozen=True)
class OpenCondition:
    """A condition met at the last check, with the level already notified."""

    key: str
    kind: str
    subject: str
    level: int
    label: str
    message: str
    link: str
    since_ms: int
    notified_ms: int


@dataclass(frozen=True)
class Notification:
    """What one alert says; `conditions` is the JSON list sent to every channel."""

    type: str  # alert | test
    subject: str
    conditions: list[dict[str, Any]]


@dataclass(frozen=True)
class CheckRecorded:
    """What one alert check made durable: the conditions newly met, the keys cleared, the notification."""

    new: tuple[Any, ...]  # core.alerts.Condition
    cleared: tuple[str, ...]
    alert_id: int | None
    levels: dict[str, int]  # the notified level of every open condition now


@dataclass(frozen=True)
class Delivery:
    id: int
    alert_id: int
    channel: str  # email | webhook
    target: str  # address or URL
    webhook_id: int | None
    state: str  # pending | sent | failed
    attempts: int
    next_ms: int
    last_error: str | None
    sent_ms: int | None
    created_ms: int
    subject: str
    type: str
    conditions: list[dict[str, Any]]


@dataclass(frozen=True)
class SentAlert:
    """A notification in the history, with the state of each of its deliveries."""

    id: int
    created_ms: int
    type: str
    subject: str
    conditions: list[dict[str, Any]]
    deliveries: tuple[Delivery, ...]


@dataclass(frozen=True)
class EventQuery:
    start: datetime | None = None
    end: datetime | None = None
    code: str | None = None
    item_id: str | None = None
    type: str | None = None


class Store(Protocol):
    # True when other nodes write the same database (PostgreSQL): the ledger then
    # follows their changes and reads rows again after a conflict.
    shared: bool

    async def open(self) -> None: ...

    async def close(self, timeout: float | None = None) -> None: ...

    async def ready(self) -> bool: ...

    async def load(self, per_slice_types: tuple[str, ...] = (), now_ms: int = 0) -> Snapshot: ...

    async def write(self, batch: WriteBatch, pipeline: int | None = None) -> None: ...

    async def load_catalog(self) -> Snapshot: ...

    async def reload(self, items: set[str], clients: set[str]) -> Reloaded: ...

    async def device_rows(self, clients: set[str]) -> tuple[list[Seat], list[AuthorizationRecord], dict[str, str]]: ...

    async def lapsed_seats(self, now_ms: int, limit: int) -> list[Seat]: ...

    async def item_seats(self, item_id: str, limit: int, offset: int = 0) -> list[Seat]: ...

    async def item_holders(self, item_id: str, seats: bool, now_ms: int, limit: int, offset: int = 0
                           ) -> tuple[int, list[Holder]]: ...

    async def borrowed_count(self, item_id: str, now_ms: int) -> int: ...

    async def code_seats(self, items: set[str]) -> dict[tuple[str, str], int]: ...

    async def count_borrowed_slices(self, now_ms: int, quantities: dict[str, tuple[str, int]], wait: bool = True
                                    ) -> RollupResult: ...

    def events(self, query: EventQuery) -> AsyncIterator[StoredEvent]: ...

    async def size_bytes(self) -> int: ...

    async def report_seen(self, report_id: str) -> bool: ...

    async def roll_up(self, quantities: dict[str, tuple[str, int]], limit: int = 50_000, wait: bool = True
                      ) -> RollupResult: ...

    async def rollup_series(self, scope: str, key: str, size: str, start_ms: int, end_ms: int) -> list[RollupRow]: ...

    async def rollups_at(self, scope: str, size: str, bucket_ms: int) -> dict[str, RollupRow]: ...

    async def rollup_lag(self) -> int: ...

    async def rollup_conversion(self) -> int: ...

    async def convert_marks(self, now_ms: int, limit: int = 2000) -> int: ...

    async def prune_marks(self, before_day: int, limit: int = 5000, wait: bool = True) -> int: ...

    async def prune_counters(self, horizons: dict[str, int], limit: int = 5000, wait: bool = True) -> int: ...

    async def admin_password_hash(self) -> str | None: ...

    async def set_admin_password(self, password_hash: str, at_ms: int, only_if_unset: bool = False) -> bool: ...

    async def add_admin_token(self, token_hash: str, at_ms: int, expires_ms: int) -> None: ...

    async def admin_token_expiry(self, token_hash: str) -> int | None: ...

    async def delete_admin_token(self, token_hash: str) -> None: ...

    # -- alerts -----------------------------------------------------------------

    async def code_requests_since(self, since_ms: int) -> dict[str, tuple[int, int]]: ...

    async def alert_settings(self) -> AlertSettings: ...

    async def set_alert_recipients(self, recipients: str) -> None: ...

    async def set_disabled_alert_kinds(self, kinds: frozenset[str]) -> None: ...

    async def add_webhook(self, url: str, secret: str, at_ms: int) -> Webhook: ...

    async def delete_webhook(self, webhook_id: int) -> bool: ...

    async def open_conditions(self) -> list[OpenCondition]: ...

    async def record_alert_check(self, at_ms: int, met: Iterable[Any]) -> CheckRecorded: ...

    async def enqueue_notification(self, at_ms: int, notification: Notification) -> int: ...

    async def due_deliveries(self, now_ms: int, limit: int = 100) -> list[Delivery]: ...

    async def claim_delivery(self, delivery_id: int, now_ms: int, until_ms: int) -> bool: ...

    async def retry_deliveries_now(self, now_ms: int) -> int: ...

    async def mark_delivered(self, delivery_id: int, at_ms: int) -> None: ...

    async def mark_retry(self, delivery_id: int, next_ms: int, error: str, give_up: bool = False) -> None: ...

    async def alert_history(self, limit: int = 50, before_id: int | None = None) -> list[SentAlert]: ...
