"""The ledger: the live licensing state in memory and the one writer that changes it.

Every change (a handshake, an import, a sweep) runs as a job inside a single
writer task: it decides against the in-memory state with the pure core,
applies the outcome in memory, and adds its rows to a WriteBatch. Jobs that
queue up while a commit is in flight share the next commit (group commit).
An answer is given only after its batch is durable; if the commit fails, the
in-memory changes of the whole batch are undone and every job in it fails, so
nothing acknowledged is lost and no seat is granted twice.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from lts_server import bindings as binding_index
from lts_server import logs, reportkeys
from lts_server import queue as seat_queue
from lts_server.core import codes as code_rules
from lts_server.core import handshake as hs
from lts_server.core import reservations
from lts_server.core.borrowing import still_borrowed
from lts_server.core.codes import CodeError, CodeFields
from lts_server.core.model import (
    EXPIRY_GRACE,
    LICENSE_TYPES,
    Counts,
    HandshakeCode,
    Item,
    ItemStatus,
    License,
    SeatLimit,
    hard_limit,
)
from lts_server.core.ordering import usage_order
from lts_server.core.times import from_ms, to_ms, utcnow
from lts_server.core.usage import tolerance
from lts_server.devices import Device, DeviceCache
from lts_server.errors import Code, Refusal
from lts_server.licensefile import Binding
from lts_server.passwords import session_hash, session_matches
from lts_server.store import (
    AuthorizationRecord,
    BorrowSpan,
    Change,
    CodeLimits,
    Conflict,
    Event,
    ImportRecord,
    LicenseRecord,
    Reloaded,
    Seat,
    Snapshot,
    Store,
    StoreError,
    Unstorable,
    UsageReportRecord,
    WriteBatch,
)
from lts_server.store import sql_trust

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
MAX_BATCH = 512
# How often a job is decided again after conflicts on a shared store.
SHARED_RETRIES = 8
MAX_IN_FLIGHT = 4
# Seats one sweep frees at most, so a mass expiry never stalls handshakes.
MAX_SWEEP = 5000
# How long report ids stay in memory; older duplicates are found in the database.
RECENT_REPORTS = timedelta(minutes=10)
# License types whose grants all stay in memory (see Ledger._concurrent_grants).
PER_SLICE_TYPES = tuple(t.value for t, rules in LICENSE_TYPES.items() if rules.per_slice)
_ABSENT = object()

Undo = list[Callable[[], None]]


def _set(mapping: MutableMapping[K, V], key: K, value: V, undo: Undo) -> None:
    old = mapping.get(key, _ABSENT)  # type: ignore[arg-type]
    mapping[key] = value
    if old is _ABSENT:
        undo.append(lambda: mapping.pop(key, None))
    else:
        undo.append(lambda: mapping.__setitem__(key, old))  # type: ignore[arg-type]


def _pop(mapping: MutableMapping[K, V], key: K, undo: Undo) -> None:
    if key in mapping:
        old = mapping.pop(key)
        undo.append(lambda: mapping.__setitem__(key, old))


class LedgerClosed(Exception):
    pass


class JobFailed(Exception):
    """A job could not be completed; nothing of it was stored."""


class UsageError(Exception):
    """A usage record that cannot be counted; names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class NotBorrowed(Exception):
    """A return of a seat that is not borrowed."""


# Import states that are not a license in use: a rejection, one the admin dismissed, a rejected file deleted.
REJECTION_STATES = ("rejected", "dismissed", "removed")

# Events after which another node's ledger reads licenses, items and codes again.
CATALOG_EVENTS = ("import.", "code.", "item.")

# Refusals a job raises before it changes anything: they fail that job alone.
JOB_REFUSALS: tuple[type[Exception], ...] = (CodeError, NotFound, UsageError, NotBorrowed)


@dataclass
class _Job(Generic[T]):
    run: Callable[[datetime, WriteBatch, Undo], T] | None
    future: asyncio.Future[T]
    retries: int = 0
    # Instead of run: awaited by the writer once every commit before it is settled, before any later job.
    barrier: Callable[[], Awaitable[T]] | None = None
    # Devices the job reads and changes, pinned in memory until the writer is done with the job.
    devices: tuple[str, ...] = ()


@dataclass
class _Flight:
    """A batch whose changes are applied in memory and whose commit is under way."""

    jobs: list[_Job[Any]]
    results: list[Any]
    undo: Undo
    write: asyncio.Future[None]
    batch: WriteBatch
    # Run once the batch is durable (answers to queued requests a job of the batch served).
    after: list[Callable[[], None]] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class HandshakeOutcome:
    decision: hs.Decision
    status: ItemStatus | None = None
    # Granted only: the authorization's id and the key its device MACs usage reports with.
    authorization_id: str | None = None
    report_key: bytes | None = None
    # Granted from an item whose license is bound to this server's key: the vendor's binding to hand on.
    binding: binding_index.ItemBinding | None = None
    # Refused because the client UUID is bound to another device's fingerprint (151).
    clone: bool = False
    # Granted with a borrowed seat, held offline until then.
    borrowed_until: datetime | None = None
    # Granted: when the authorization ends (the fit's end, or a running borrow's when later).
    expires_at: datetime | None = None
    # Refused for want of a seat with waitSeconds: it waits in the queue (lts_server/queue.py).
    waiter: seat_queue.Waiter | None = None
    # Refused after waiting: its place in the queue; or why it could not wait (the queue is full).
    queue_position: int | None = None
    queue_note: str | None = None
    # The server stops while the request waits: answer 503.
    stopped: bool = False


@dataclass(frozen=True)
class ReturnOutcome:
    item_id: str | None
    released: bool  # False: nothing borrowed was left to return (returned before, or lapsed)
    borrowed_until: datetime | None = None


@dataclass(frozen=True)
class UsageRecord:
    slot: datetime
    product: str
    operation: str
    count: int
    item_id: str | None = None


@dataclass(frozen=True)
class UsageReport:
    report_id: str
    client_uuid: str
    handshake_code: str
    records: tuple[UsageRecord, ...]


@dataclass(frozen=True)
class UsageOutcome:
    duplicate: bool = False
    accepted: int = 0
    refusal: Refusal | None = None
    charged: dict[str, int] = dataclasses.field(default_factory=dict)
    seat_refreshed: bool = False


@dataclass(frozen=True)
class ImportOutcome:
    state: str  # imported | renewed | unchanged | rejected
    license_id: str | None
    reason: str | None = None
    # False when the file was already rejected as-is for the same reason: nothing new was recorded.
    recorded: bool = True


class Ledger:
    def __init__(self, store: Store, secret: bytes, clock: Callable[[], datetime] = utcnow,
                 device_cache: int = 100_000, max_waiting: int = 10_000) -> None:
        self.store = store
        self.clock = clock
        self._secret = secret
        self._queue: asyncio.Queue[_Job[Any]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._pipeline = 0
        self._retry: list[_Job[Any]] = []
        self.licenses: dict[str, LicenseRecord] = {}
        self.items: dict[str, Item] = {}
        self.statuses: dict[str, ItemStatus] = {}
        self.codes: dict[str, HandshakeCode] = {}
        self.organization_defaults: dict[str, str] = {}
        self.imports: dict[str, ImportRecord] = {}
        # Seats and authorizations of the devices in use; the database holds every device's.
        self.devices = DeviceCache(store.device_rows, device_cache)
        # item -> client -> live authorization, for items counted per slice (concurrent devices,
        # instances): a grant there depends on every other device's, so all of them stay in memory.
        self._concurrent_grants: dict[str, dict[str, AuthorizationRecord]] = {}
        # Report ids counted lately; older ones are found in the database.
        self._recent_reports: dict[str, datetime] = {}
        # The vendor's bindings by item (lts_server/bindings.py), from the stored binding of each revision.
        self.bindings: dict[str, binding_index.ItemBinding] = {}
        self._binding_rows: list[sql_trust.BindingRow] = []
        # item -> authorizations granted before this ended (a renewal replaced the item's license).
        self.cutoffs: dict[str, datetime] = {}
        # The earliest time time-limited items and seats may be judged at (lts_server/clock.py), if any.
        self.time_floor: Callable[[datetime], datetime] | None = None
        # Seat limits per code: item -> code -> limit (from the codes), and (code, item) -> seats the code holds.
        self._limits: dict[str, dict[str, SeatLimit]] = {}
        self.code_seats: dict[tuple[str, str], int] = {}
        self.queue = seat_queue.SeatQueue(max_waiting)
        # The waiter a job is deciding for now: the seats held back for the queue are its own.
        self._serving: seat_queue.Waiter | None = None
        self._after: list[Callable[[], None]] = []
        self._serve_pending = False
        self._no_waiting = False
        # Told after a commit that freed seats of items other nodes' devices wait for (store/pg_queue.py).
        self.on_room: Callable[[set[str]], None] | None = None
        self._freed: set[str] = set()
        # A PostgreSQL cluster's shared queue order and the other nodes' waiters (store/pg_queue.py).
        self.queue_feed: Any = None

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self._load(await self.store.load(PER_SLICE_TYPES, to_ms(self.clock())))
        await self._load_trust()
        self._writer = asyncio.create_task(self._write_loop(), name="ledger-writer")
        self._writer.add_done_callback(_writer_stopped)

    async def _load_trust(self) -> None:
        """The bindings and the authorization cutoffs (stores without them, e.g. in tests, have none)."""
        if not isinstance(self.store, sql_trust.TrustOperations):
            return
        self._binding_rows = await self.store.load_bindings()
        self._index_bindings()
        self.cutoffs = {item: from_ms(ms) for item, ms in (await self.store.load_cutoffs()).items()}

    def _index_bindings(self) -> None:
        bound = {r.license.license_id for r in self.licenses.values() if r.license.server_key is not None}
        self.bindings = binding_index.index(self._binding_rows, bound)

    def judged(self, now: datetime) -> datetime:
        """When time-limited items and seats are judged: now, unless the clock is behind its records."""
        return self.time_floor(now) if self.time_floor is not None else now

    def _load(self, snap: Snapshot) -> None:
        self._apply_catalog(snap)
        for auth in snap.authorizations.values():
            self._concurrent_grants.setdefault(auth.item_id, {})[auth.client_uuid] = auth

    async def close(self, timeout: float | None = None) -> None:
        """Finish every queued job (for at most `timeout` seconds: then what is left is not done), then
        stop the writer."""
        self._closed = True
        if self._writer is None:
            return
        # Every queued job done - or the writer gone, when a bug stopped it (then nothing is left to wait for).
        joined = asyncio.ensure_future(self._queue.join())
        done, _ = await asyncio.wait([joined, self._writer], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:  # commits that cannot finish (the database is away): not acknowledged, so nothing is lost
            logs.event("ledger.stop_cut", logs.logging.WARNING, seconds=timeout, jobs=self._queue.qsize())
        joined.cancel()
        self._writer.cancel()
        try:
            await self._writer
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: S110 - a writer that stopped on a bug was logged by _writer_stopped
            pass
        self._writer = None
        while not self._queue.empty():
            _abandon(self._queue.get_nowait())

    # -- the writer --------------------------------------------------------

    async def submit(self, run: Callable[[datetime, WriteBatch, Undo], T], devices: tuple[str, ...] = ()) -> T:
        """Queue a job for the writer; `devices` are loaded and pinned in memory for it."""
        if self._closed or self._writer is None:
            raise LedgerClosed("the server is shutting down")
        if self._writer.done():  # a bug stopped the writer: refuse rather than queue forever
            raise JobFailed("internal error: the ledger's writer stopped; see the log")
        if devices:
            await self.devices.pin(devices)  # the writer unpins them when it is done with the job
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(run, future, devices=devices))
        return await future

    def _done(self, job: _Job[Any]) -> None:
        """The writer is done with the job: its batch committed, or was undone."""
        if job.devices:
            self.devices.unpin(job.devices)
        self._queue.task_done()

    async def _write_loop(self) -> None:
        """Take queued jobs as batches and keep up to MAX_IN_FLIGHT commits under way.

        Batch N+1 is decided while batch N commits (on the database thread,
        in order). Answers go out only when a batch's commit is done. If a
        commit fails, every later batch is refused by the store too (same
        pipeline id); all of them are undone in memory, newest first, and
        their jobs fail - except after a conflict, where only the job that
        conflicted fails and the others are decided again.
        """
        flights: deque[_Flight] = deque()
        getter: asyncio.Task[_Job[Any]] | None = None
        try:
            while True:
                if getter is None and len(flights) < MAX_IN_FLIGHT:
                    getter = asyncio.ensure_future(self._queue.get())
                waits: list[asyncio.Future[Any]] = [getter] if getter is not None else []
                if flights:
                    waits.append(flights[0].write)
                if not self._retry:  # jobs to decide again (a conflict landed while draining) go now
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                await self._land(flights)
                # Jobs to decide again go first: they were queued before anything still waiting.
                jobs, self._retry = self._retry, []
                barrier: _Job[Any] | None = None
                if getter is not None and getter.done():
                    job = getter.result()
                    getter = None
                    while True:
                        if job.barrier is not None:
                            barrier = job
                            break
                        jobs.append(job)
                        if len(jobs) >= MAX_BATCH or self._queue.empty():
                            break
                        job = self._queue.get_nowait()
                if jobs:
                    flight = self._start(jobs)
                    if flight is not None:
                        flights.append(flight)
                if barrier is not None:
                    await self._drain(flights)
                    await self._pass_barrier(barrier)
        finally:
            if getter is not None:
                getter.cancel()
            # Stopped with commits unsettled (a stop that could not wait, or a bug): none is acknowledged.
            for flight in flights:
                flight.write.cancel()
                for job in flight.jobs:
                    _abandon(job)
            for job in self._retry:
                _abandon(job)

    async def _land(self, flights: deque[_Flight]) -> None:
        """Settle the finished commits at the head of the pipeline, in order; a failed one recovers them all."""
        while flights and flights[0].write.done():
            flight = flights[0]  # still in flights while recovering: a stop meanwhile abandons its jobs
            if flight.write.cancelled() or flight.write.exception() is not None:
                await self._recover(list(flights))
                flights.clear()
            else:
                flights.popleft()
                self._settle(flight)

    async def _drain(self, flights: deque[_Flight]) -> None:
        """Wait for every commit in flight and land it."""
        while flights:
            await asyncio.wait([flights[0].write])
            await self._land(flights)

    async def _pass_barrier(self, job: _Job[Any]) -> None:
        assert job.barrier is not None
        try:
            result = await job.barrier()
        except Exception as e:
            if not job.future.done():  # its caller may have gone (a cancelled follower)
                job.future.set_exception(e)
        else:
            if not job.future.done():
                job.future.set_result(result)
        self._queue.task_done()
        if self.queue:  # another node's changes may have freed seats that waiters here are due
            self._queue_changed()

    def _start(self, jobs: list[_Job[Any]]) -> _Flight | None:
        batch = WriteBatch(at=self.clock())
        undo: Undo = []
        results: list[Any] = []
        self._after = after = []
        for index, job in enumerate(jobs):
            batch.begin_job(index)
            assert job.run is not None
            try:
                results.append(job.run(self.clock(), batch, undo))
            except JOB_REFUSALS as refusal:
                job.future.set_exception(refusal)
                results.append(None)
            except Exception as e:  # a bug: undo the whole batch rather than commit half of it
                logs.event("ledger.job_failed", logs.logging.ERROR, error=repr(e))
                for fn in reversed(undo):
                    fn()
                failure = JobFailed(f"internal error: {type(e).__name__}: {e}")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(failure)
                    self._done(j)
                return None
        write = asyncio.ensure_future(self.store.write(batch, self._pipeline))
        return _Flight(jobs, results, undo, write, batch, after)

    def _settle(self, flight: _Flight) -> None:
        for job, result in zip(flight.jobs, flight.results):
            if not job.future.done():
                job.future.set_result(result)
            self._done(job)
        for fn in flight.after:
            fn()
        if self.queue:
            self._queue_changed()

    async def _recover(self, flights: list[_Flight]) -> None:
        await asyncio.gather(*(f.write for f in flights), return_exceptions=True)
        first = flights[0].write
        error = first.exception() if not first.cancelled() else None
        failure = error if isinstance(error, StoreError) else StoreError(f"commit failed: {error!r}")
        for flight in reversed(flights):
            for fn in reversed(flight.undo):
                fn()
        if self.store.shared:
            # Other nodes may have changed what these batches touched: read it again before deciding anew.
            try:
                await self._reread([f.batch for f in flights])
            except Exception as e:  # the database is away: decide on what memory holds; conflicts re-read later
                logs.event("ledger.reread_failed", logs.logging.ERROR, error=str(e))
        # A conflict is one job's change that the database refused: on a store
        # only this ledger writes, that job fails (its change contradicts what
        # the database holds); on a shared store it is decided again too, on
        # the rows just read. Every other job is decided again (once) on the
        # state as it now is. Any other failure (disk full, lock) fails them all.
        # A value the database cannot store fails the job that brought it, and only that one: every
        # other job is decided again without it, however often (each such failure removes one job).
        culprit = None
        named = isinstance(error, (Conflict, Unstorable)) and error.job is not None
        if named and error.job < len(flights[0].jobs):
            culprit = flights[0].jobs[error.job]
        unstorable = isinstance(error, Unstorable) and culprit is not None
        # A conflict no job caused (transactions of two nodes that crossed: a deadlock, a serialization
        # failure): every job is decided again.
        crossed = isinstance(error, Conflict) and error.job is None and self.store.shared
        # Nodes racing for an item's last seats can conflict again; each round settles at least one claim.
        retries = SHARED_RETRIES if self.store.shared else 1
        retry: list[_Job[Any]] = []
        for flight in flights:
            for job in flight.jobs:
                if job.future.done():  # refused before it changed anything
                    self._done(job)
                elif unstorable and job is not culprit:
                    retry.append(job)
                elif (not unstorable and (crossed or (culprit is not None and (job is not culprit or self.store.shared)))
                      and job.retries < retries):
                    job.retries += 1
                    retry.append(job)
                else:
                    job.future.set_exception(failure)
                    self._done(job)
        if unstorable:  # the request's fault, answered 400: not an error of the server
            name, level = "ledger.job_unstorable", logs.logging.WARNING
        elif isinstance(error, Conflict) and self.store.shared:
            # Nodes racing for an item's last seats, or transactions that crossed: decided again, not a fault.
            name, level = "ledger.commit_conflict", logs.logging.INFO
        else:  # a full disk or a lost database fails every commit while it lasts: one line per interval
            name, level = "ledger.commit_failed", logs.logging.ERROR
        logs.event_limited(name, level, error=str(failure), jobs=sum(len(f.jobs) for f in flights),
                           retried=len(retry))
        self._retry = retry + self._retry
        self._pipeline += 1

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the writer (for the metrics)."""
        return self._queue.qsize()

    # -- the view the core reads ------------------------------------------

    def default_codes(self, organization_id: str) -> list[str]:
        """The organization's default codes, oldest license first (a code chosen as its default first)."""
        chosen = self.organization_defaults.get(organization_id)
        names = [chosen] if chosen in self.codes else []
        firsts = sorted(
            (r.first_imported_at, r.license.license_id)
            for r in self.licenses.values()
            if r.license.organization_id == organization_id
        )
        for _, license_id in firsts:
            name = default_code_name(organization_id, license_id)
            if name in self.codes and name not in names:
                names.append(name)
        return names

    def open_rejections(self) -> list[ImportRecord]:
        """Rejected files, by path, except those a fixed file replaced: the exact bytes imported since (by any
        path), or their license imported later at the same or a higher revision."""
        imported = {r.sha256 for r in self.imports.values() if r.state not in REJECTION_STATES}
        fixed = {r.license_id: r for r in self.imports.values()
                 if r.state not in REJECTION_STATES and r.license_id is not None}

        def replaced(r: ImportRecord) -> bool:
            later = fixed.get(r.license_id) if r.license_id else None
            return r.sha256 in imported or (later is not None and later.seen_at >= r.seen_at
                                            and (later.revision or 0) >= (r.revision or 0))

        return sorted((r for r in self.imports.values() if r.state == "rejected" and not replaced(r)),
                      key=lambda r: r.path)

    def organization_known(self, organization_id: str) -> bool:
        return any(c.organization_id == organization_id for c in self.codes.values())

    def status(self, item_id: str) -> ItemStatus:
        return self.statuses.get(item_id) or ItemStatus()

    def seat_expiry(self, item_id: str, client_uuid: str) -> datetime | None:
        seat = self.devices[client_uuid].seats.get(item_id)
        return seat.expires_at if seat else None

    def instances_elsewhere(self, item_id: str, client_uuid: str, now: datetime) -> int:
        return sum(a.instances for c, a in self._concurrent_grants.get(item_id, {}).items()
                   if c != client_uuid and a.expires_at > now)

    def share(self, item_id: str, code: HandshakeCode) -> reservations.Share:
        # While the writer decides for a waiter, the seats held back for the queue are that waiter's.
        waiting = self._blocking(item_id) if self._serving is None and self.queue else 0
        return self._share(item_id, code, waiting)

    def _share(self, item_id: str, code: HandshakeCode, waiting: int) -> reservations.Share:
        on_item = self._limits.get(item_id)
        if on_item is None:
            return reservations.Share(waiting=waiting) if waiting else reservations.FREE
        held = {name: self.code_seats.get((name, item_id), 0) for name in on_item}
        return reservations.share_of(code, item_id, on_item, held, waiting)

    def _blocking(self, item_id: str) -> int:
        """Waiters the item's free seats are held for: those of codes not at their cap on it."""
        return sum(n for name, n in self.queue.codes_waiting(item_id).items() if not self._capped(name, item_id))

    def _capped(self, code_name: str, item_id: str) -> bool:
        lim = self._limits.get(item_id, {}).get(code_name)
        return (lim is not None and lim.max_seats is not None
                and self.code_seats.get((code_name, item_id), 0) >= lim.max_seats)

    def seat_limits(self, item_id: str) -> dict[str, tuple[SeatLimit, int]]:
        """code -> (its limit on the item, the seats it holds), for the admin views."""
        return {name: (lim, self.code_seats.get((name, item_id), 0))
                for name, lim in self._limits.get(item_id, {}).items()}

    def _rebuild_limits(self) -> None:
        self._limits = reservations.limits_by_item(self.codes.values())

    def authorization_id(self, auth: AuthorizationRecord) -> str:
        return reportkeys.authorization_id(self._secret, auth.code, auth.client_uuid, to_ms(auth.granted_at))

    async def report_key(self, code: str, client_uuid: str) -> bytes | None:
        """The key of the device's current authorization on the code, which its usage reports are MACed with."""
        auth = (await self.device(client_uuid)).authorizations.get(code)
        return reportkeys.report_key(self._secret, self.authorization_id(auth)) if auth else None

    async def device(self, client_uuid: str) -> Device:
        """The device's seats and authorizations as the ledger sees them (in memory, else as stored)."""
        await self.devices.load((client_uuid,))
        return self.devices.get(client_uuid) or Device()

    def password_matches(self, code: HandshakeCode, given: str | None) -> bool:
        return code.password_hash is not None and session_matches(self._secret, code.password_hash, given)

    def hash_session_password(self, password: str) -> str:
        return session_hash(self._secret, password)

    def ordered_items(self, code: HandshakeCode) -> list[str]:
        return usage_order(code.items, self.items, code.custom_order)

    # -- jobs ----------------------------------------------------------------

    async def handshake(self, req: hs.Request, fingerprint: str | None = None,
                        wait_until: float | None = None) -> HandshakeOutcome:
        """Decide and apply one handshake. `fingerprint`: the SHA-256 (hex) of the device's deviceFingerprint,
        when it sent one. With `wait_until` (time.monotonic()), a request that finds no free seat joins the
        queue instead of being refused: the outcome then carries its waiter."""
        ticket = await self._ticket() if wait_until is not None else None

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> HandshakeOutcome:
            return self._handshake(req, now, batch, undo, ticket=ticket, wait_until=wait_until,
                                   fingerprint=fingerprint)

        return await self.submit(run, (req.client_uuid,))

    def _clone_refused(self, req: hs.Request, now: datetime, batch: WriteBatch) -> HandshakeOutcome:
        """The client UUID is bound to another device's fingerprint: 151, an event, and the clone's time stored."""
        resolved = hs.resolve_codes(req, self)
        code = resolved.code_name if isinstance(resolved, hs.Refused) else resolved[0].name
        refusal = Refusal(Code.CLONE_DETECTED, f"client UUID {req.client_uuid} is bound to another device's "
                                               "fingerprint; the admin can reset its binding")
        batch.events.append(_handshake_event(req, now, code, None, int(refusal.code)))
        batch.events.append(Event(at=now, type="device.clone_detected", code=code, client_uuid=req.client_uuid,
                                  product=req.product, deployment_type=req.deployment_type.value))
        batch.extras.append(sql_trust.clone_extra(req.client_uuid, to_ms(now)))
        return HandshakeOutcome(hs.Refused(refusal, code), clone=True)

    async def reset_device_binding(self, client_uuid: str) -> None:
        """Forget the fingerprint a client UUID is bound to: its next grant binds it again."""

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> None:
            device = self.devices[client_uuid]
            if device.fingerprint is None:
                raise NotFound(f"fingerprint binding of device {client_uuid}")
            old = device.fingerprint
            device.fingerprint = None
            undo.append(lambda: setattr(device, "fingerprint", old))
            batch.extras.append(sql_trust.unbind_device_extra(client_uuid))
            batch.events.append(Event(at=now, type="device.binding_reset", client_uuid=client_uuid))

        await self.submit(run, (client_uuid,))

    async def _ticket(self) -> int:
        """The next place in the queues: cluster-wide on a shared store (one database sequence)."""
        if self.queue_feed is not None:
            return await self.queue_feed.ticket()
        return self.queue.next_ticket()

    def _handshake(self, req: hs.Request, now: datetime, batch: WriteBatch, undo: Undo,
                   ticket: int | None = None, wait_until: float | None = None,
                   waiter: seat_queue.Waiter | None = None, fingerprint: str | None = None) -> HandshakeOutcome:
        device = self.devices[req.client_uuid]
        if fingerprint is not None and device.fingerprint not in (None, fingerprint):
            return self._clone_refused(req, now, batch)
        decision = hs.decide(req, self, now, self.password_matches, self.judged(now))
        if isinstance(decision, hs.Refused):
            note = None
            if decision.full and waiter is not None:  # served from the queue, and still no seat: it stays
                return HandshakeOutcome(decision)
            if decision.full and ticket is not None and wait_until is not None:
                if self._no_waiting:
                    return HandshakeOutcome(decision, stopped=True)
                first = decision.item_id or decision.full[0]
                if not self.queue.full(first):
                    return HandshakeOutcome(decision, waiter=self._join(req, decision, ticket, wait_until, undo,
                                                                        fingerprint))
                note = f"the queue of item {first} is full ({self.queue.max_waiting} waiting; queue.max_waiting)"
            batch.events.append(_handshake_event(req, now, decision.code_name, decision.item_id,
                                                 int(decision.refusal.code)))
            return HandshakeOutcome(decision, queue_note=note)
        fit = decision.fit
        item_id = fit.item.item_id
        code = decision.code
        if fingerprint is not None and device.fingerprint is None:  # the first grant binds the client UUID
            device.fingerprint = fingerprint
            undo.append(lambda: setattr(device, "fingerprint", None))
            batch.extras.append(sql_trust.bind_device_extra(req.client_uuid, fingerprint, to_ms(now), batch.job))
        borrowed = fit.borrowed_until
        if fit.seat is hs.SeatAction.CLAIM:
            seat = Seat(item_id, req.client_uuid, now, now, fit.expires_at, code.name, borrowed)
            _set(device.seats, item_id, seat, undo)
            status = self.status(item_id)
            _set(self.statuses, item_id, dataclasses.replace(status, seats_used=status.seats_used + 1), undo)
            limited = (code.name, item_id) in self.code_seats
            if limited:
                _set(self.code_seats, (code.name, item_id), self.code_seats[(code.name, item_id)] + 1, undo)
            # A seat on another item of the code that this node does not know of (taken through
            # another node) makes the claim conflict; seats it knows did not cover the request.
            unknown = tuple(i for i in code.items
                            if i != item_id and self.seat_expiry(i, req.client_uuid) is None)
            # A cluster node may grant it from a seat lease: only where no code reserves or caps seats of the
            # item and no request waits for one (store/sql_leases.py).
            leasable = self.store.shared and item_id not in self._limits and not self.queue.waiting(item_id)
            batch.claim(seat, fit.limit, unknown, limited, fit.reserved, leasable)
            batch.events.append(_seat_event("seat.granted", seat, code.name, now))
        elif fit.seat is hs.SeatAction.REFRESH:
            old = device.seats[item_id]
            # A running borrow is kept (a borrowing device that comes back online does not lose it).
            kept = still_borrowed(old.borrowed_until, now)
            borrowed = max(borrowed, kept) if borrowed and kept else borrowed or kept
            seat = dataclasses.replace(old, refreshed_at=now, expires_at=max(old.expires_at, fit.expires_at),
                                       borrowed_until=borrowed)
            _set(device.seats, item_id, seat, undo)
            batch.refresh(seat)
            batch.events.append(_seat_event("seat.refreshed", seat, code.name, now))
        elif (held := device.seats.get(item_id)) is not None:  # a concurrent item's borrowed seat
            borrowed = still_borrowed(held.borrowed_until, now)
        expires = max(fit.expires_at, borrowed) if borrowed else fit.expires_at
        if fit.borrowed_until is not None:
            batch.borrows.append(BorrowSpan(item_id, req.client_uuid, code.name, now, fit.borrowed_until))
        auth = AuthorizationRecord(code.name, req.client_uuid, item_id, fit.instances, now, expires)
        _set(device.authorizations, auth.code, auth, undo)
        if fit.item.rules.per_slice:
            _set(self._concurrent_grants.setdefault(item_id, {}), req.client_uuid, auth, undo)
        batch.authorizations.append(auth)
        batch.events.append(_handshake_event(req, now, code.name, item_id, 0))
        authorization_id = self.authorization_id(auth)
        return HandshakeOutcome(decision, self.status(item_id), authorization_id,
                                reportkeys.report_key(self._secret, authorization_id),
                                binding=self.bindings.get(item_id), borrowed_until=borrowed, expires_at=expires)

    # -- the seat queue ------------------------------------------------------------

    def _join(self, req: hs.Request, decision: hs.Refused, ticket: int, wait_until: float,
              undo: Undo, fingerprint: str | None = None) -> seat_queue.Waiter:
        waiter = seat_queue.Waiter(ticket, decision.code_name or "", decision.full, wait_until, req, decision,
                                   decision.item_id, asyncio.get_running_loop().create_future(),
                                   fingerprint=fingerprint)
        self.queue.add(waiter)
        undo.append(lambda: self.queue.remove(waiter))
        # Its device stays in memory while it waits: the job that frees a seat decides for it at once.
        self.devices.hold((req.client_uuid,))
        undo.append(lambda: self.devices.unpin((req.client_uuid,)))
        if self.queue_feed is not None:
            self._after.append(lambda: self.queue_feed.joined(waiter))  # type: ignore[union-attr]
        return waiter

    def _leave(self, waiter: seat_queue.Waiter, state: seat_queue.State, undo: Undo) -> None:
        self.queue.remove(waiter, state)
        undo.append(lambda: self.queue.restore(waiter))
        if state is seat_queue.State.DONE:
            self._finish(waiter, undo)

    def _finish(self, waiter: seat_queue.Waiter, undo: Undo | None) -> None:
        assert waiter.req is not None
        client = (waiter.req.client_uuid,)
        self.devices.unpin(client)
        if undo is not None:
            undo.append(lambda: self.devices.hold(client))
        if self.queue_feed is not None:
            if undo is not None:
                self._after.append(lambda: self.queue_feed.left(waiter))
            else:
                self.queue_feed.left(waiter)

    def _deliver(self, waiter: seat_queue.Waiter, outcome: HandshakeOutcome) -> None:
        """After the commit: the waiter has its answer."""
        waiter.state = seat_queue.State.DONE
        self._finish(waiter, None)
        if waiter.future is not None and not waiter.future.done():
            waiter.future.set_result(outcome)

    def room_for(self, code_name: str, item_id: str) -> bool:
        """Whether a request of this code could take a seat of the item now, the queue aside."""
        code = self.codes.get(code_name)
        item = self.items.get(item_id)
        if code is None or item is None or item_id not in code.items:
            return True  # its decision refuses it (101, 124, ...): the answer is due now
        limit = hard_limit(item.license_type, item.quantity) if item.rules.counts is Counts.SEATS else item.quantity
        return reservations.claim_kind(self.status(item_id).seats_used, limit,
                                       self._share(item_id, code, 0)) is not None

    def _first_due(self, item_id: str) -> seat_queue.Waiter | None:
        """The first waiter (in ticket order, any node's) that could take a seat of the item now."""
        # Per code first (a few), so that a full item costs no walk through its queue.
        due = {code for code in self.queue.codes_waiting(item_id) if self.room_for(code, item_id)}
        if not due:
            return None
        return next((w for w in self.queue.in_order(item_id) if w.code in due), None)

    def _serve(self, item_id: str, now: datetime, batch: WriteBatch, undo: Undo) -> int:
        """Hand the item's free seats to its queue, first due first, in the running job; returns how many."""
        served = 0
        while (waiter := self._first_due(item_id)) is not None and not waiter.remote:
            assert waiter.req is not None
            self._serving = waiter
            try:
                outcome = self._handshake(waiter.req, now, batch, undo, waiter=waiter, fingerprint=waiter.fingerprint)
            finally:
                self._serving = None
            if isinstance(outcome.decision, hs.Refused) and outcome.decision.full:
                break  # not a seat after all: it keeps its place
            self.queue.remove(waiter, seat_queue.State.SERVING)
            undo.append(lambda w=waiter: self.queue.restore(w))  # type: ignore[misc]
            self._after.append(lambda w=waiter, o=outcome: self._deliver(w, o))  # type: ignore[misc]
            served += 1
        return served

    def _queue_changed(self) -> None:
        """After a commit or another node's changes: serve the queues if a waiter here is due a seat."""
        self.queue.compact()
        if self._freed and self.on_room is not None:
            freed, self._freed = self._freed, set()
            self.on_room(freed)
        if self._serve_pending or not self.queue.local or self._closed:
            return
        for item_id in self.queue.items_waited_for():
            due = self._first_due(item_id)
            if due is not None and not due.remote:
                self._serve_pending = True
                asyncio.ensure_future(self._serve_queues())
                return

    async def _serve_queues(self) -> None:
        def run(now: datetime, batch: WriteBatch, undo: Undo) -> int:
            return sum(self._serve(item_id, now, batch, undo) for item_id in self.queue.items_waited_for())

        try:
            served = await self.submit(run)
        except (LedgerClosed, JobFailed, StoreError) as e:
            logs.event("queue.serve_failed", logs.logging.WARNING, error=str(e))
            served = 0
        finally:
            self._serve_pending = False
        if served:
            self._queue_changed()

    def queue_check(self) -> None:
        """Once a second: waiters whose client went leave the queue; other nodes' waiters past their time are
        forgotten; and the queues are served if that made a waiter here due."""
        for waiter in list(self.queue.local.values()):
            if waiter.live and waiter.connected is not None and not waiter.connected():
                waiter.connected = None  # one give-up job is enough
                asyncio.ensure_future(self._gone(waiter))
        if self.queue.expire_remote(time.monotonic()) or self.queue.local:
            self._queue_changed()

    async def _gone(self, waiter: seat_queue.Waiter) -> None:
        try:
            await self.give_up(waiter, gone=True)
        except (LedgerClosed, JobFailed, StoreError) as e:  # its time runs out anyway; then it leaves
            logs.event("queue.leave_failed", logs.logging.WARNING, error=str(e))

    async def give_up(self, waiter: seat_queue.Waiter, gone: bool = False) -> HandshakeOutcome:
        """The waiter's time ran out (or its client went): refused with its place in the queue, unless a
        seat reached it first."""

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> HandshakeOutcome | None:
            if waiter.state is not seat_queue.State.QUEUED:
                return None  # served: its outcome is on the way
            position = self.queue.position(waiter, waiter.item_id)
            self._leave(waiter, seat_queue.State.DONE, undo)
            refused = waiter.refusal
            assert waiter.req is not None and isinstance(refused, hs.Refused)
            batch.events.append(dataclasses.replace(
                _handshake_event(waiter.req, now, refused.code_name, refused.item_id, int(refused.refusal.code)),
                detail={"queuePosition": position, "left": "disconnected" if gone else "timeout"}))
            outcome = HandshakeOutcome(refused, queue_position=position)
            future = waiter.future
            if future is not None:  # whoever still awaits the waiter hears it too
                self._after.append(lambda: None if future.done() else future.set_result(outcome))
            return outcome

        outcome = await self.submit(run)
        if outcome is None:
            assert waiter.future is not None
            return await waiter.future
        return outcome

    def stop_waiting(self) -> None:
        """The server stops: every waiting request here gets its answer now (503: try again), and requests
        arriving from now on do not wait."""
        self._no_waiting = True
        for waiter in list(self.queue.local.values()):
            if waiter.state is seat_queue.State.QUEUED:
                self.queue.remove(waiter)
                self._finish(waiter, None)
                if waiter.future is not None and not waiter.future.done():
                    waiter.future.set_result(HandshakeOutcome(waiter.refusal, stopped=True))

    # -- borrowing -------------------------------------------------------------------

    async def return_borrowed(self, code_name: str, client_uuid: str) -> ReturnOutcome:
        """A device gives its borrowed seat back early: released, and its authorization ends now. Again: nothing."""

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> ReturnOutcome:
            device = self.devices[client_uuid]
            auth = device.authorizations.get(code_name)
            if auth is None:
                raise NotFound(f"authorization of device {client_uuid} on {code_name}")
            seat = device.seats.get(auth.item_id)
            if seat is None and auth.expires_at > now:  # a running grant on a concurrent item: no seat to give
                raise NotBorrowed(f"device {client_uuid} holds an authorization on item {auth.item_id} that is not "
                                  "borrowed: it ends with its period (an admin can release it)")
            if seat is None or (seat.borrowed_until is not None and seat.borrowed_until <= now):
                return ReturnOutcome(auth.item_id, False)  # returned (or lapsed) already
            if seat.borrowed_until is None:
                raise NotBorrowed(f"device {client_uuid} holds a seat of item {auth.item_id} that is not borrowed: "
                                  "it lapses with its period (an admin can release it)")
            self._release(seat, "returned", code_name, now, batch, undo)
            ended = dataclasses.replace(auth, expires_at=now)
            _set(device.authorizations, code_name, ended, undo)
            grants = self._concurrent_grants.get(auth.item_id)
            if grants is not None:
                _pop(grants, client_uuid, undo)
            batch.authorizations.append(ended)
            return ReturnOutcome(auth.item_id, True, seat.borrowed_until)

        return await self.submit(run, (client_uuid,))

    async def report_usage(self, report: UsageReport) -> UsageOutcome:
        """Count one usage report, once; see docs/api.md for what each license type counts."""

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> UsageOutcome:
            if report.report_id in self._recent_reports:
                return UsageOutcome(duplicate=True)
            code = self.codes.get(report.handshake_code)
            if code is None:
                return UsageOutcome(refusal=Refusal(Code.UNKNOWN_CODE, repr(report.handshake_code)))
            auth = self.devices[report.client_uuid].authorizations.get(code.name)
            if auth is None:
                return UsageOutcome(refusal=Refusal(
                    Code.NO_MATCHING_ITEM, f"device {report.client_uuid} holds no authorization for {code.name} "
                                           "(none granted, or it ended: a seat released, a code deleted)",
                    next_step="handshake again, then report under the new authorization"))
            ended = self._ended(auth, now)
            if ended is not None:
                return UsageOutcome(refusal=ended)
            targets = []
            for i, record in enumerate(report.records):
                item_id = record.item_id or auth.item_id
                if record.item_id is not None and item_id not in code.items and item_id != auth.item_id:
                    raise UsageError(f"records[{i}].itemId", f"item {item_id} is not drawn on by {code.name}")
                item = self.items.get(item_id)
                if item is None:
                    raise UsageError(f"records[{i}].itemId", f"item {item_id} does not exist")
                targets.append(item)
            charged: dict[str, int] = {}
            for record, item in zip(report.records, targets):
                counts = item.rules.counts
                if counts is Counts.UNITS and record.count:
                    charged[item.item_id] = charged.get(item.item_id, 0) + record.count
                batch.events.append(Event(
                    at=record.slot, type="usage.record", code=code.name, item_id=item.item_id,
                    client_uuid=report.client_uuid, product=record.product, units=record.count,
                    instances=auth.instances if counts is Counts.INSTANCES else None,
                    detail={"operation": record.operation, "reportId": report.report_id}))
            for item_id, units in charged.items():
                status = self.status(item_id)
                _set(self.statuses, item_id, dataclasses.replace(status, units_used=status.units_used + units), undo)
                batch.unit_charges[item_id] = batch.unit_charges.get(item_id, 0) + units
            refreshed = self._refresh_seat(auth.item_id, report.client_uuid, now, batch, undo)
            batch.count_report(UsageReportRecord(report.report_id, report.client_uuid, code.name, now))
            batch.events.append(Event(at=now, type="usage.report", code=code.name, item_id=auth.item_id,
                                      client_uuid=report.client_uuid,
                                      detail={"reportId": report.report_id, "records": len(report.records)}))
            self._remember_report(report.report_id, now, undo)
            return UsageOutcome(accepted=len(report.records), charged=charged, seat_refreshed=refreshed)

        return await self.submit(run, (report.client_uuid,))

    def _ended(self, auth: AuthorizationRecord, now: datetime) -> Refusal | None:
        """Why usage reports under this authorization are refused now, if they are: its license was replaced,
        its item revoked, or past its expiry and grace (judged as handshakes are)."""
        cutoff = self.cutoffs.get(auth.item_id)
        if cutoff is not None and auth.granted_at < cutoff:
            return Refusal(Code.NO_MATCHING_ITEM, f"the authorization on item {auth.item_id} ended when its license was "
                                                  "replaced", next_step="handshake again, then report under the new "
                                                                        "authorization")
        item = self.items.get(auth.item_id)
        if item is None:
            return Refusal(Code.ITEM_MISSING, f"item {auth.item_id} no longer exists")
        if self.status(auth.item_id).revoked:
            return Refusal(Code.REVOKED, f"item {auth.item_id} is revoked")
        if self.judged(now) >= item.expires_at + EXPIRY_GRACE:
            return Refusal(Code.EXPIRED, f"item {auth.item_id} expired at {item.expires_at.isoformat()}")
        return None

    def _end_authorizations(self, client_uuid: str, item_id: str, batch: WriteBatch, undo: Undo) -> None:
        """The device's authorizations on the item end (a forced release): its report keys with them."""
        device = self.devices[client_uuid]
        for code, auth in list(device.authorizations.items()):
            if auth.item_id == item_id:
                _pop(device.authorizations, code, undo)
        _pop(self._concurrent_grants.get(item_id, {}), client_uuid, undo)
        batch.extras.append(sql_trust.end_authorizations_extra(client_uuid=client_uuid, item_ids=(item_id,)))

    def _refresh_seat(self, item_id: str, client_uuid: str, now: datetime, batch: WriteBatch, undo: Undo) -> bool:
        seats = self.devices[client_uuid].seats
        seat = seats.get(item_id)
        item = self.items.get(item_id)
        if seat is None or item is None:
            return False
        new = dataclasses.replace(seat, refreshed_at=now,
                                  expires_at=max(seat.expires_at, hs.authorization_end(item, now, self.judged(now))))
        _set(seats, item_id, new, undo)
        batch.refresh(new)
        batch.events.append(_seat_event("seat.refreshed", new, None, now))
        return True

    def _remember_report(self, report_id: str, now: datetime, undo: Undo) -> None:
        horizon = now - RECENT_REPORTS
        while self._recent_reports:
            oldest = next(iter(self._recent_reports))
            if self._recent_reports[oldest] >= horizon:
                break
            del self._recent_reports[oldest]
        _set(self._recent_reports, report_id, now, undo)

    # -- other nodes (a shared store) ------------------------------------------------

    async def follow(self, events: list[Change]) -> None:
        """Take in what other nodes committed: their events name what changed, the rows are read again.

        The rows are read and applied between two batches, with nothing of this
        node in flight, so they are never older than what this node wrote.
        """
        items: set[str] = set()
        clients: set[str] = set()
        reports: list[str] = []
        catalog = False
        for e in events:
            catalog = catalog or e.type.startswith(CATALOG_EVENTS)
            if e.item_id:
                items.add(e.item_id)
            # A device out of memory is read from the database when it next asks; per-slice grants
            # are all in memory (_concurrent_grants), so theirs are read again whatever the device.
            if e.client_uuid and (e.client_uuid in self.devices or self._per_slice(e.item_id)):
                clients.add(e.client_uuid)
            if e.type == "usage.report" and e.report_id:
                reports.append(e.report_id)
        if not (items or clients or catalog):
            return

        async def read_and_apply() -> None:
            # Committed elsewhere: applied without an undo.
            if catalog:
                known = set(self.codes)
                self._apply_catalog(await self.store.load_catalog())
                await self._load_trust()
                self._drop_code_authorizations(known - set(self.codes))
            self._apply_reloaded(await self.store.reload(items | self._items_held_by(clients), clients), clients)
            for report_id in reports:
                self._recent_reports[report_id] = self.clock()

        await self._barrier(read_and_apply)

    async def _barrier(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self._closed or self._writer is None:
            raise LedgerClosed("the server is shutting down")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(None, future, barrier=fn))
        return await future

    async def _reread(self, batches: list[WriteBatch]) -> None:
        items: set[str] = set()
        clients: set[str] = set()
        for b in batches:
            for change in b.seat_changes:
                items.add(change.seat.item_id)
                clients.add(change.seat.client_uuid)
            for auth in b.authorizations:
                items.add(auth.item_id)
                clients.add(auth.client_uuid)
            for _, report in b.usage_reports:
                clients.add(report.client_uuid)
                if await self.store.report_seen(report.report_id):
                    self._recent_reports[report.report_id] = b.at or self.clock()
        self._apply_reloaded(await self.store.reload(items | self._items_held_by(clients), clients), clients)

    def _drop_code_authorizations(self, codes: set[str], undo: Undo | None = None) -> None:
        """Forget in memory the authorizations of deleted codes (the database's go with them)."""
        for client, device in self.devices.items():
            for code in codes & device.authorizations.keys():
                if undo is None:
                    del device.authorizations[code]
                else:
                    _pop(device.authorizations, code, undo)
        for grants in self._concurrent_grants.values():
            for client in [c for c, a in grants.items() if a.code in codes]:
                if undo is None:
                    del grants[client]
                else:
                    _pop(grants, client, undo)

    def _per_slice(self, item_id: str | None) -> bool:
        item = self.items.get(item_id) if item_id else None
        return item is not None and item.rules.per_slice

    def _items_held_by(self, clients: set[str]) -> set[str]:
        """Items the devices hold seats on, as far as memory knows (devices not in memory: none)."""
        return {item_id for c in clients if (d := self.devices.get(c)) is not None for item_id in d.seats}

    def _apply_catalog(self, snap: Snapshot) -> None:
        self.licenses = snap.licenses
        self.items = snap.items
        self.statuses = snap.statuses
        self.codes = snap.codes
        self.organization_defaults = snap.organization_defaults
        self.imports = snap.imports
        self.code_seats = snap.code_seats
        self._rebuild_limits()

    def _apply_reloaded(self, reloaded: Reloaded, clients: set[str]) -> None:
        """Rows as stored now replace what memory holds of `clients` (devices not in memory stay out)."""
        fresh = {c: Device(fingerprint=reloaded.bindings.get(c)) for c in clients if c in self.devices}
        for grants in self._concurrent_grants.values():
            for client in clients:
                grants.pop(client, None)
        for seat in reloaded.seats:
            if (device := fresh.get(seat.client_uuid)) is not None:
                device.seats[seat.item_id] = seat
        for auth in reloaded.authorizations:
            if (device := fresh.get(auth.client_uuid)) is not None:
                device.authorizations[auth.code] = auth
            item = self.items.get(auth.item_id)
            if item is not None and item.rules.per_slice:
                self._concurrent_grants.setdefault(auth.item_id, {})[auth.client_uuid] = auth
        for client, device in fresh.items():
            self.devices.put(client, device)
        self.statuses.update(reloaded.statuses)
        for key, held in reloaded.code_seats.items():
            if key in self.code_seats:
                self.code_seats[key] = held

    async def mirror_overuse(self, deltas: dict[str, int]) -> None:
        """Reflect overuse the rollup job committed; record items that became overused."""

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> None:
            for item_id, delta in deltas.items():
                item = self.items.get(item_id)
                if item is None:
                    continue
                status = self.status(item_id)
                used = status.overuse_used + delta
                overused = status.overused or used >= tolerance(item.quantity)
                _set(self.statuses, item_id, dataclasses.replace(status, overuse_used=used, overused=overused), undo)
                if overused and not status.overused:
                    batch.events.append(Event(at=now, type="item.overused", item_id=item_id,
                                              detail={"overuseUsed": used, "tolerance": tolerance(item.quantity)}))

        await self.submit(run)

    async def sweep(self) -> int:
        """Free seats whose active period has lapsed (at most MAX_SWEEP a call); returns how many."""
        lapsed = await self.store.lapsed_seats(to_ms(self.judged(self.clock())), MAX_SWEEP)
        self._prune_concurrent_grants(self.clock())

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> int:
            now = self.judged(now)  # a clock set back never keeps a lapsed seat
            freed = 0
            # The database lists what lapsed as committed; memory is the truth for the devices
            # (a refresh or release may be in flight), so a listed seat only counts if it still lapsed.
            for listed in lapsed:
                seat = self.devices[listed.client_uuid].seats.get(listed.item_id)
                if seat is not None and seat.expires_at <= now:
                    self._release(seat, "lapsed", None, now, batch, undo)
                    freed += 1
            return freed

        return await self.submit(run, tuple({s.client_uuid for s in lapsed}))

    def _prune_concurrent_grants(self, now: datetime) -> None:
        """Forget per-slice grants that ended: they no longer count (instances_elsewhere), and the
        devices' own rows keep them for usage reports."""
        for grants in self._concurrent_grants.values():
            for client in [c for c, a in grants.items() if a.expires_at <= now]:
                del grants[client]

    def _release(self, seat: Seat, reason: str, code: str | None, now: datetime, batch: WriteBatch, undo: Undo) -> None:
        _pop(self.devices[seat.client_uuid].seats, seat.item_id, undo)
        status = self.status(seat.item_id)
        _set(self.statuses, seat.item_id, dataclasses.replace(status, seats_used=max(0, status.seats_used - 1)), undo)
        held = (seat.code, seat.item_id)
        limited = seat.code is not None and held in self.code_seats
        if limited:
            _set(self.code_seats, held, max(0, self.code_seats[held] - 1), undo)  # type: ignore[index]
        batch.release(seat, limited)
        detail: dict[str, Any] = {"reason": reason}
        if (borrowed := still_borrowed(seat.borrowed_until, now)) is not None:
            batch.borrows.append(BorrowSpan(seat.item_id, seat.client_uuid, seat.code, now, now, end=True))
            detail["borrowedUntil"] = borrowed.isoformat()
        batch.events.append(
            Event(at=now, type="seat.released", code=code, item_id=seat.item_id, client_uuid=seat.client_uuid,
                  detail=detail)
        )
        if self.queue and self.queue.waiting(seat.item_id):
            self._serve(seat.item_id, now, batch, undo)  # the seat goes to the queue in this same commit
            if self.queue.remote:
                self._freed.add(seat.item_id)

    async def record_import(
        self, path: str, sha256: str, verified_license: License | None, key_id: str, text: str, rejection: str | None,
        binding: Binding | None = None,
    ) -> ImportOutcome:
        """Import one verified file, or record why it was rejected; one transaction either way."""

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> ImportOutcome:
            reason = rejection
            if reason is None:
                assert verified_license is not None
                reason = self._import_conflict(verified_license)
            if reason is not None:
                known = self.imports.get(path)
                if known is not None and (known.state, known.sha256, known.reason) == ("rejected", sha256, reason):
                    return ImportOutcome("rejected", known.license_id, reason, recorded=False)
                record = ImportRecord(path, sha256, "rejected", now, reason,
                                      verified_license.license_id if verified_license else None,
                                      verified_license.revision if verified_license else None)
                _set(self.imports, path, record, undo)
                batch.imports.append(record)
                batch.events.append(Event(at=now, type="import.rejected", detail={
                    "path": path, "sha256": sha256, "reason": reason}))
                return ImportOutcome("rejected", record.license_id, reason)
            assert verified_license is not None
            state = self._apply_license(verified_license, key_id, sha256, text, path, now, batch, undo)
            if state != "unchanged":
                self._apply_binding(verified_license, binding, state, now, batch, undo)
            record = ImportRecord(path, sha256, state, now, None, verified_license.license_id,
                                  verified_license.revision)
            _set(self.imports, path, record, undo)
            batch.imports.append(record)
            return ImportOutcome(state, verified_license.license_id)

        return await self.submit(run)

    async def dismiss_rejection(self, name: str) -> ImportRecord:
        """The admin dismisses a rejection (by path or file name): it no longer alerts or counts; the same bytes
        are not tried again, a changed file is."""

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> ImportRecord:
            found = [r for r in self.imports.values() if r.state == "rejected"
                     and name in (r.path, r.path.rsplit("/", 1)[-1], r.path.removeprefix("upload:"))]
            if not found:
                raise NotFound(f"import rejection {name!r}")
            if len(found) > 1:
                raise CodeError("name", f"{name!r} names {len(found)} rejected files; give the full path: "
                                        + ", ".join(r.path for r in found), status=409)
            old = found[0]
            record = dataclasses.replace(old, state="dismissed", seen_at=now)
            _set(self.imports, old.path, record, undo)
            batch.imports.append(record)
            batch.events.append(Event(at=now, type="import.dismissed", detail={
                "path": old.path, "sha256": old.sha256, "reason": old.reason}))
            return record

        return await self.submit(run)

    async def clear_removed(self, paths: list[str]) -> int:
        """Rejected (or dismissed) files no longer in the import folder: their rejection ends, as an event."""

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> int:
            cleared = 0
            for path in paths:
                old = self.imports.get(path)
                if old is None or old.state not in ("rejected", "dismissed"):
                    continue
                record = dataclasses.replace(old, state="removed", seen_at=now)
                _set(self.imports, path, record, undo)
                batch.imports.append(record)
                batch.events.append(Event(at=now, type="import.removed", detail={
                    "path": path, "sha256": old.sha256, "reason": old.reason, "was": old.state}))
                cleared += 1
            return cleared

        return await self.submit(run)

    def _import_conflict(self, lic: License) -> str | None:
        existing = self.licenses.get(lic.license_id)
        if existing is not None:
            old = existing.license
            if old.organization_id != lic.organization_id:
                return (f"organization-changed: license {lic.license_id} belongs to organization "
                        f"{old.organization_id}, the file says {lic.organization_id}")
            if lic.revision < old.revision or (lic.revision == old.revision and not old.same_as(old.renewed_by(lic))):
                return (f"stale-revision: license {lic.license_id} revision {old.revision} is imported; "
                        f"this file has revision {lic.revision} with different content")
        for item in lic.items:
            owner = self.items.get(item.item_id)
            if owner is not None and owner.license_id != lic.license_id:
                return f"item-owned: item {item.item_id} belongs to license {owner.license_id}"
        if existing is None:
            name = default_code_name(lic.organization_id, lic.license_id)
            if name in self.codes:
                return f"code-name-taken: a handshake code named {name} already exists; rename or delete it"
        return None

    def _apply_license(self, lic: License, key_id: str, sha256: str, text: str, path: str, now: datetime,
                       batch: WriteBatch, undo: Undo) -> str:
        existing = self.licenses.get(lic.license_id)
        merged = existing.license.renewed_by(lic) if existing else lic
        if existing is not None and existing.license.same_as(merged):
            return "unchanged"
        first = existing.first_imported_at if existing else now
        record = LicenseRecord(merged, key_id, sha256, text, first, now)
        _set(self.licenses, lic.license_id, record, undo)
        new_items = [i.item_id for i in lic.items if i.item_id not in self.items]
        for item in lic.items:
            _set(self.items, item.item_id, item, undo)
            if item.item_id not in self.statuses:
                _set(self.statuses, item.item_id, ItemStatus(), undo)
        batch.licenses.append(record)
        state = "renewed" if existing else "imported"
        batch.events.append(Event(at=now, type=f"import.{state}", detail={
            "path": path, "sha256": sha256, "licenseId": lic.license_id, "revision": lic.revision,
            "items": [i.item_id for i in lic.items]}))
        name = default_code_name(lic.organization_id, lic.license_id)
        if existing is None:
            self._create_default_code(lic, now, batch, undo)
        elif new_items and name in self.codes:
            code = self.codes[name]
            code = dataclasses.replace(code, items=code.items + tuple(new_items))
            _set(self.codes, name, code, undo)
            batch.codes.append(code)
            batch.events.append(Event(at=now, type="code.edited", code=name,
                                      detail={"itemsAdded": new_items, "reason": "renewal"}))
        return state


    def _apply_binding(self, lic: License, binding: Binding | None, state: str, now: datetime, batch: WriteBatch,
                       undo: Undo) -> None:
        """Keep the revision's binding; a renewal ends the authorizations on the license's items."""
        if binding is not None:
            row = sql_trust.BindingRow(binding.license_id, binding.revision, binding.key_id,
                                       base64.b64encode(binding.statement).decode(), binding.signature,
                                       binding.item_ids)
            rows = self._binding_rows
            self._binding_rows = [*rows, row]
            undo.append(lambda: setattr(self, "_binding_rows", rows))
            batch.extras.append(sql_trust.bindings_extra([row]))
        indexed = self.bindings
        self._index_bindings()
        undo.append(lambda: setattr(self, "bindings", indexed))
        if state == "renewed":
            items = tuple(i.item_id for i in self.licenses[lic.license_id].license.items)
            for item_id in items:
                _set(self.cutoffs, item_id, now, undo)
            batch.extras.append(sql_trust.cutoff_extra(items, to_ms(now)))

    def _create_default_code(self, lic: License, now: datetime, batch: WriteBatch, undo: Undo,
                             **detail: Any) -> HandshakeCode:
        """The license's default code, holding all of its items."""
        code = HandshakeCode(name=default_code_name(lic.organization_id, lic.license_id),
                             organization_id=lic.organization_id, items=tuple(i.item_id for i in lic.items),
                             is_default=True, source_license_id=lic.license_id)
        _set(self.codes, code.name, code, undo)
        batch.codes.append(code)
        batch.events.append(Event(at=now, type="code.created", code=code.name,
                                  detail={"items": list(code.items), "default": True, **detail}))
        return code

    # -- administration -------------------------------------------------------

    async def create_code(self, organization_id: str, fields: CodeFields) -> HandshakeCode:
        def run(now: datetime, batch: WriteBatch, undo: Undo) -> HandshakeCode:
            if not self.organization_known(organization_id):
                raise CodeError("organizationId", f"no imported license belongs to organization {organization_id!r}")
            code = code_rules.create(organization_id, fields, self.items, self.codes)
            undo.append(self._rebuild_limits)
            _set(self.codes, code.name, code, undo)
            self._limits_changed(None, code, batch, undo)
            batch.codes.append(code)
            batch.events.append(Event(at=now, type="code.created", code=code.name, detail=_code_detail(code)))
            return code

        return await self._submit_counting(run)

    def _limits_changed(self, old: HandshakeCode | None, new: HandshakeCode | None, batch: WriteBatch,
                        undo: Undo) -> None:
        """A code's seat limits changed (or the code came or went): store them, keep the counts they need."""
        before = {lim.item_id: lim for lim in old.seat_limits} if old else {}
        after = {lim.item_id: lim for lim in new.seat_limits} if new else {}
        if before == after:
            return
        name = (new or old).name  # type: ignore[union-attr]
        for item_id in before.keys() - after.keys():
            _pop(self.code_seats, (name, item_id), undo)
        for item_id in after.keys() - before.keys():
            _set(self.code_seats, (name, item_id), 0, undo)  # counted from the database after the commit
        batch.code_limits.append(CodeLimits(name, tuple(after.values()), tuple(sorted(before.keys() | after.keys()))))
        self._rebuild_limits()

    async def _submit_counting(self, run: Callable[[datetime, WriteBatch, Undo], T]) -> T:
        """Submit a code job, then, with nothing in flight, read the seats each code holds on items whose
        limits it changed: a new limit counts the seats its code already holds (store/sql_offline.py)."""
        if self._closed or self._writer is None:
            raise LedgerClosed("the server is shutting down")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        counted: asyncio.Future[None] = loop.create_future()

        async def recount() -> None:
            items = {i for (_, i) in self.code_seats}
            if items:
                fresh = await self.store.code_seats(items)
                for key in list(self.code_seats):
                    self.code_seats[key] = fresh.get(key, 0)

        self._queue.put_nowait(_Job(run, done))
        self._queue.put_nowait(_Job(None, counted, barrier=recount))
        try:
            return await done
        finally:
            await asyncio.wait([counted])
            if not counted.cancelled() and counted.exception() is not None:
                logs.event("ledger.recount_failed", logs.logging.ERROR, error=str(counted.exception()))

    async def edit_code(self, name: str, fields: CodeFields) -> HandshakeCode:
        def run(now: datetime, batch: WriteBatch, undo: Undo) -> HandshakeCode:
            old = self._code(name)
            code = code_rules.edit(old, fields, self.items, self.codes)
            undo.append(self._rebuild_limits)
            if code.name != old.name:
                _pop(self.codes, old.name, undo)
                batch.codes_deleted.append(old.name)
                for org, chosen in list(self.organization_defaults.items()):
                    if chosen == old.name:
                        _set(self.organization_defaults, org, code.name, undo)
                        batch.organization_defaults[org] = code.name
            _set(self.codes, code.name, code, undo)
            self._limits_changed(old, code, batch, undo)
            batch.codes.append(code)
            changed = [f.name for f in dataclasses.fields(code)
                       if f.name != "password_hash" and getattr(code, f.name) != getattr(old, f.name)]
            if changed:
                batch.events.append(Event(at=now, type="code.edited", code=code.name,
                                          detail={"changed": changed, "previousName": old.name,
                                                  **_code_detail(code)}))
            if code.password_hash != old.password_hash:
                batch.events.append(Event(at=now, type="code.password_changed", code=code.name,
                                          detail={"passwordSet": code.password_hash is not None}))
            return code

        return await self._submit_counting(run)

    async def delete_code(self, name: str) -> None:
        def run(now: datetime, batch: WriteBatch, undo: Undo) -> None:
            code = self._code(name)
            undo.append(self._rebuild_limits)
            _pop(self.codes, name, undo)
            self._limits_changed(code, None, batch, undo)
            batch.codes_deleted.append(name)
            batch.events.append(Event(at=now, type="code.deleted", code=name, detail=_code_detail(code)))
            self._drop_code_authorizations({name}, undo)
            batch.extras.append(sql_trust.end_authorizations_extra(code=name))

        await self.submit(run)

    async def restore_default_code(self, license_id: str) -> HandshakeCode:
        """Recreate a license's deleted default code, holding all of the license's items."""

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> HandshakeCode:
            record = self.licenses.get(license_id)
            if record is None:
                raise NotFound(f"license {license_id}")
            lic = record.license
            name = default_code_name(lic.organization_id, lic.license_id)
            if name in self.codes:
                raise CodeError("licenseId", f"the default code {name} exists; nothing to restore", status=409)
            return self._create_default_code(lic, now, batch, undo, restored=True)

        return await self.submit(run)

    async def set_usage_order(self, name: str, order: tuple[str, ...] | None) -> HandshakeCode:
        """A custom order (a permutation of the code's items), or None for the default order."""

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> HandshakeCode:
            old = self._code(name)
            code = code_rules.reorder(old, order) if order is not None else code_rules.default_order(old)
            _set(self.codes, name, code, undo)
            batch.codes.append(code)
            batch.events.append(Event(at=now, type="code.reordered" if order is not None else "code.order_reset",
                                      code=name, detail={"order": self.ordered_items(code)}))
            return code

        return await self.submit(run)

    async def set_revoked(self, item_id: str, revoked: bool) -> ItemStatus:
        def run(now: datetime, batch: WriteBatch, undo: Undo) -> ItemStatus:
            if item_id not in self.items:
                raise NotFound(f"item {item_id}")
            status = dataclasses.replace(self.status(item_id), revoked=revoked)
            _set(self.statuses, item_id, status, undo)
            batch.revocations[item_id] = revoked
            batch.events.append(Event(at=now, type="item.revoked" if revoked else "item.restored", item_id=item_id))
            return status

        return await self.submit(run)

    async def release_seat(self, item_id: str, client_uuid: str) -> Seat:
        """Free a device's seat (a borrowed one too: the device keeps working offline until borrowedUntil)."""

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> Seat:
            seat = self.devices[client_uuid].seats.get(item_id)
            if seat is None:
                raise NotFound(f"seat of device {client_uuid} on item {item_id}")
            self._release(seat, "forced", None, now, batch, undo)
            self._end_authorizations(client_uuid, item_id, batch, undo)
            return seat

        return await self.submit(run, (client_uuid,))

    async def end_grant(self, item_id: str, client_uuid: str) -> None:
        """Force-release a device's hold on an item counted without seats (concurrent, units, domain): its
        running authorizations there end now, so it no longer counts; its next handshake is decided afresh."""

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> None:
            device = self.devices[client_uuid]
            running = [a for a in device.authorizations.values() if a.item_id == item_id and a.expires_at > now]
            if not running:
                raise NotFound(f"running authorization of device {client_uuid} on item {item_id}")
            for auth in running:
                ended = dataclasses.replace(auth, expires_at=now)
                _set(device.authorizations, auth.code, ended, undo)
                if self._per_slice(item_id):
                    _pop(self._concurrent_grants.setdefault(item_id, {}), client_uuid, undo)
                batch.authorizations.append(ended)
                batch.events.append(Event(at=now, type="seat.released", code=auth.code, item_id=item_id,
                                          client_uuid=client_uuid, detail={"reason": "forced"}))

        return await self.submit(run, (client_uuid,))

    def _code(self, name: str) -> HandshakeCode:
        code = self.codes.get(name)
        if code is None:
            raise NotFound(f"handshake code {name}")
        return code


def _abandon(job: _Job[Any]) -> None:
    if not job.future.done():
        job.future.set_exception(LedgerClosed("the server stopped before this was recorded"))


def _writer_stopped(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logs.log.error("ledger.writer_stopped", exc_info=task.exception())


def _code_detail(code: HandshakeCode) -> dict[str, Any]:
    return {"items": list(code.items), "customOrder": code.custom_order, "domains": list(code.domains),
            "appIds": list(code.app_ids), "processNames": list(code.process_names),
            "passwordSet": code.password_hash is not None, "borrowMaxDays": code.borrow_max_days,
            "itemLimits": limits_json(code)}


def limits_json(code: HandshakeCode) -> dict[str, dict[str, int | None]]:
    """A code's seat limits as the API writes them: item -> {reservedSeats, maxSeats}."""
    return {lim.item_id: {"reservedSeats": lim.reserved_seats, "maxSeats": lim.max_seats} for lim in code.seat_limits}


def default_code_name(organization_id: str, license_id: str) -> str:
    return f"{organization_id}-{license_id}"


def _handshake_event(req: hs.Request, now: datetime, code: str | None, item_id: str | None, result: int) -> Event:
    return Event(at=now, type="handshake", code=code, item_id=item_id, client_uuid=req.client_uuid,
                 product=req.product, deployment_type=req.deployment_type.value, result=result)


def _seat_event(kind: str, seat: Seat, code: str | None, now: datetime) -> Event:
    detail = {"expiresAt": seat.expires_at.isoformat()}
    if seat.borrowed_until is not None and seat.borrowed_until > now:
        detail["borrowedUntil"] = seat.borrowed_until.isoformat()
    return Event(at=now, type=kind, code=code, item_id=seat.item_id, client_uuid=seat.client_uuid, detail=detail)
