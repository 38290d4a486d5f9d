"""Assembles a running server from a Config: store, identity, ledger, importer, HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lts_server import config as config_mod
from lts_server import identity, licensefile, logs, signer, writer
from lts_server.alerts import Alerter
from lts_server.archive import Archiver
from lts_server.clock import ClockGuard, ClockStatus
from lts_server.config import Config
from lts_server.core import alerts as alert_rules
from lts_server.core.times import iso, to_ms, utcnow
from lts_server.core.usage import DAY_MS, MARKS_DAYS
from lts_server.importer import Importer
from lts_server.ledger import MAX_SWEEP, ImportOutcome, Ledger
from lts_server.metrics import LiveState, Metrics
from lts_server.signer import BatchSigner
from lts_server.statelock import StateBusy, StateLock
from lts_server.store import Store, StoreError
from lts_server.store.pg_queue import PgQueueFeed
from lts_server.store.sql import Position
from lts_server.store.sql_offline import SLICES_PER_CALL
from lts_server.store.postgres import IMPORT_LOCK, PostgresStore
from lts_server.store.sqlite import SQLiteStore
from lts_server.web.app import create_app
from lts_server.web.connections import GUARD, ConnectionGuard, Limits, ProtocolLog
from lts_server.web.errors import json_protocol_errors
from lts_server.web.services import Services
from lts_server.writer import WriterSocket

SWEEP_SECONDS = 60.0
SWEEP_RETRY_SECONDS = 5.0
# Rollups trail the event log by about this much.
ROLLUP_SECONDS = 1.0
# Events per rollup transaction: small, so device commits queued behind it on
# the database thread wait a few milliseconds, not a hundred.
ROLLUP_PAGE = 500
PRUNE_SECONDS = 3600.0
# Rows per transaction when pruning the rollups, and old-release device marks per conversion step.
PRUNE_PAGE = 5000
CONVERT_PAGE = 2000
# How often events older than [events] retain_days are archived.
ARCHIVE_SECONDS = 3600.0
# Seconds a stop still gets after the last in-flight request if those took all of shutdown_timeout:
# to flush the ledger's commits and close the database, when it answers.
STOP_GRACE = 1.0
# How often the seat queues forget other nodes' waiters past their time (and serve if that frees a turn).
QUEUE_CHECK_SECONDS = 1.0


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The listening port's TLS context when [server] names a certificate and key (a front process's too)."""
    server = cfg.server
    if not server.tls_cert or not server.tls_key:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.path(server.tls_cert), cfg.path(server.tls_key))
    return ctx


def _ports(listener: asyncio.Server) -> list[int]:
    return sorted({sock.getsockname()[1] for sock in listener.sockets})


# Connections the kernel queues before accept(). asyncio accepts up to this many at once and
# only then runs the guard, so that many descriptors (twice: the ones the guard closes are
# released an iteration later) must stay free beyond max_connections.
BACKLOG = 128
# File descriptors kept for everything but client connections: the database, the import
# folder and its watcher, license files being read, the standby check, and accept bursts.
RESERVED_FDS = 64 + 2 * BACKLOG


def connection_limits(cfg: Config) -> Limits:
    """The configured limits, with max_connections lowered to fit the file descriptor limit: past
    it, accept() fails in a loop and nobody is served."""
    server = cfg.server
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    most = server.max_connections
    if soft != resource.RLIM_INFINITY and most > soft - RESERVED_FDS:
        most = max(1, soft - RESERVED_FDS)
        logs.event("server.max_connections_lowered", logs.logging.WARNING, configured=server.max_connections,
                   used=most, open_files_limit=soft,
                   hint="raise the open files limit (LimitNOFILE= in the unit, ulimit -n) to allow more")
    return Limits(most, server.header_timeout, server.body_timeout, server.idle_timeout)


def open_store(cfg: Config) -> Store:
    if cfg.storage.backend == "postgresql":
        assert cfg.storage.url is not None
        return PostgresStore(cfg.storage.url, cfg.storage.connect_seconds, cfg.database_password(),
                             cfg.cluster.lease_ms, cfg.cluster.lease_seats)
    return SQLiteStore(cfg.database_path, cfg.storage.busy_timeout_ms)


class Server:
    def __init__(self, config: Config, clock: Callable[[], datetime] = utcnow, worker: int = 0,
                 fronted: bool = False) -> None:
        self.config = config
        self.clock = clock
        # 0: the only process; 1..N: one of server.workers processes sharing the port.
        self.worker = worker
        # The writer of server.workers > 1 on SQLite: front processes hold the port and send it handshakes.
        self.fronted = fronted
        self._frames: WriterSocket | None = None
        self.trusted: dict[str, Ed25519PublicKey] = {}
        self.runner: web.AppRunner | None = None
        self.services: Services | None = None
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.urls: list[str] = []
        self.admin_url = ""
        self._rollup_lock = asyncio.Lock()
        self._marks_converted = False
        self._store: Store | None = None
        # The change feed of a PostgreSQL cluster: read up to this position of the event log.
        self._followed: Position = (0, 0)
        self._follow_lock = asyncio.Lock()
        self._standby_checked = asyncio.Event()
        self.guard: ConnectionGuard | None = None
        self._listeners: list[asyncio.Server] = []
        self._unix_paths: list[str] = []  # removed at a stop (before the writer's lock is given up)
        self._state_lock: StateLock | None = None
        self._queue_feed: PgQueueFeed | None = None

    def load_vendor_keys(self, cfg: Config | None = None) -> dict[str, Ed25519PublicKey]:
        return licensefile.load_trusted((cfg or self.config).public_key_paths)

    async def start(self) -> None:
        cfg = self.config
        self.trusted = self.load_vendor_keys()
        metrics = Metrics()
        store = open_store(cfg)
        self._store = store
        store.on_commit = lambda events, seconds: (metrics.commit_events.observe(events),
                                                   metrics.commit_latency.observe(seconds))
        if not isinstance(store, PostgresStore):  # held while running: migrate refuses to copy a live database
            self._state_lock = StateLock(cfg.state_dir)
            try:
                self._state_lock.share()
                if self.fronted:
                    self._frames = WriterSocket()
                    self._frames.claim(cfg.state_dir)
            except (StateBusy, OSError) as e:
                raise StoreError(str(e)) from None
        await store.open()
        if isinstance(store, PostgresStore):
            ident = await identity.for_cluster(store, cfg.state_dir)
            # Read before the snapshot: what lands in between is taken in twice, harmlessly.
            self._followed = await store.log_position()
        else:
            ident = identity.load_or_create(cfg.state_dir)
        # Each process writes a usage chain of its own, continued after a restart (lts_server/usagechain.py).
        chain = await store.claim_chain(f"{identity.node_id(cfg.state_dir)}/{self.worker}", ident.server_uuid,
                                        to_ms(self.clock()))
        guard = ClockGuard(self.clock, timedelta(seconds=cfg.clock.tolerance))
        guard.load(await store.clock_tick(to_ms(self.clock())))
        ledger = Ledger(store, ident.secret, self.clock, self.config.storage.device_cache,
                        self.config.queue.max_waiting)
        ledger.time_floor = guard.judged
        await ledger.start()
        if isinstance(store, PostgresStore):
            self._queue_feed = PgQueueFeed(store, ledger.queue, self._room_elsewhere, ledger.queue_check)
            await self._queue_feed.start()
            ledger.queue_feed = self._queue_feed
            ledger.on_room = self._queue_feed.room
        try:  # the folder operators drop files into: there from the first start, so watching works
            cfg.import_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as e:
            logs.event("import.folder_not_created", logs.logging.WARNING, path=str(cfg.import_dir), error=e.strerror)
        metrics.watch(LiveState(lambda: ledger.items, lambda: ledger.statuses, lambda: ledger.queue_depth,
                                ledger.clock, ledger.queue.lengths,
                                (lambda: store.batches) if isinstance(store, PostgresStore) else dict))
        smtp = cfg.alerts.smtp
        alerter = Alerter(cfg.alerts, cfg.path(smtp.password_file) if smtp.password_file else None, store, ledger,
                          ident.server_uuid, metrics, cfg.path(smtp.ca_file) if smtp.ca_file else None)
        await alerter.start()
        importer = Importer(ledger, cfg.import_dir, ident.server_uuid, lambda: self.trusted,
                            lambda: self.config.vendor.allow_unbound,
                            self._import_turn if isinstance(store, PostgresStore) else contextlib.nullcontext,
                            cfg.import_.settle_ms, server_key=ident.public_key_b64)

        def clock_behind(status: ClockStatus) -> None:
            assert status.behind is not None and status.latest is not None
            alerter.raise_now(alert_rules.CLOCK_ALERT, ident.server_uuid, "clock behind",
                              f"The server's clock ({iso(status.now)}) is {round(status.behind.total_seconds()):,} s "
                              f"behind the latest time it recorded ({iso(status.latest)}): nothing is granted (error "
                              "160) until it catches up or the admin accepts it (ltsctl clock accept).", "/portal/")

        guard.on_behind = clock_behind

        def imported(outcome: ImportOutcome) -> None:
            metrics.imports.labels(outcome.state).inc()
            if outcome.state != "unchanged":
                alerter.request_check()

        importer.on_import = imported
        signing = BatchSigner(ident.signing_key, signer.use_thread(cfg.server.workers, cfg.storage.backend))
        self.services = Services(cfg, ident, store, ledger, importer, signing, alerter,
                                 metrics, Archiver(store, cfg.archive_dir), catch_up=self.catch_up if isinstance(store, PostgresStore) else None,
                                 clock=guard)
        guard.check()
        if self.leads:
            await importer.scan("start-up")
        separate_admin = cfg.admin.port is not None
        admin_port = cfg.admin.port if separate_admin else None
        if admin_port == 0:
            admin_port = _free_port(cfg.admin.host or cfg.server.host)
        app = create_app(self.services, admin_port)
        # The guard applies the idle timeout (and the others); aiohttp's own keep-alive timer stays at
        # its long default so that it never closes a connection before the guard can answer 408.
        runner = self.runner = web.AppRunner(app, shutdown_timeout=cfg.server.shutdown_timeout, access_log=None,
                                             logger=ProtocolLog())
        self.guard = ConnectionGuard(lambda: json_protocol_errors(runner.server()), connection_limits(cfg))
        app[GUARD] = self.guard
        await runner.setup()
        if cfg.server.standby_of:
            self._tasks.append(asyncio.create_task(self._watch_main(), name="standby"))
            await self._standby_checked.wait()  # know the main's state before serving anyone (before listening)
        scheme = "https" if cfg.server.tls_cert else "http"
        if self.fronted:
            assert self._frames is not None
            await self._frames.start(self.services, cfg.state_dir)
            await self._listen_unix(writer.socket_path(cfg.state_dir, writer.HTTP))
            self.urls = [f"unix:{cfg.state_dir / writer.HTTP}"]
        else:
            listener = await self._listen(cfg.server.host, cfg.server.port)
            self.urls = [f"{scheme}://{cfg.server.host}:{port}" for port in _ports(listener)]
        if admin_port is not None:
            admin_host = cfg.admin.host or cfg.server.host
            await self._listen(admin_host, admin_port)
            self.admin_url = f"{scheme}://{admin_host}:{admin_port}"
        else:
            self.admin_url = self.urls[0]
        self._tasks.append(asyncio.create_task(self.guard.run(self.stopping), name="connection-guard"))
        self._tasks.append(asyncio.create_task(guard.run(store.clock_tick, self.stopping), name="clock"))
        if self.leads:
            self._tasks.append(asyncio.create_task(
                importer.watch(self.stopping, cfg.import_.rescan_seconds, cfg.import_.watch), name="import-watch"))
            self._tasks.append(asyncio.create_task(self._sweeper(), name="seat-sweeper"))
        self._tasks.append(asyncio.create_task(self._roller(), name="rollups"))
        self._tasks.append(asyncio.create_task(self._check_queues(), name="seat-queues"))
        if self.leads and cfg.events.retain_days:
            self._tasks.append(asyncio.create_task(self._archive_old_events(cfg.events.retain_days),
                                                   name="event-archive"))
        if isinstance(store, PostgresStore):
            self._tasks.append(asyncio.create_task(self._follow(), name="follow"))
        # A check at start-up, then every check_seconds and whenever asked (in any process: a check
        # decides what is new inside its transaction, so two processes never raise the same alert).
        alerter.request_check()
        self._tasks.append(asyncio.create_task(alerter.run_checks(self.stopping), name="alert-checks"))
        if self.leads:  # deliveries are claimed one at a time, but one sender per machine is plenty
            self._tasks.append(asyncio.create_task(alerter.run_outbox(self.stopping), name="alert-outbox"))
        logs.event("server.listening", urls=self.urls, server_uuid=ident.server_uuid, usage_chain=chain.chain,
                   database=store.where if isinstance(store, PostgresStore) else str(cfg.database_path),
                   import_dir=str(cfg.import_dir))

    async def _listen(self, host: str, port: int) -> asyncio.Server:
        """Listen with the connection guard in front of aiohttp's protocol."""
        assert self.guard is not None
        listener = await asyncio.get_running_loop().create_server(self.guard, host, port, ssl=tls_context(self.config),
                                                                  reuse_address=True, reuse_port=self.worker > 0,
                                                                  backlog=BACKLOG)
        self._listeners.append(listener)
        return listener

    async def _listen_unix(self, path: str) -> None:
        """The writer's HTTP, which the front processes pass every request but plain handshakes to."""
        assert self.guard is not None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a writer that was killed
        listener = await asyncio.get_running_loop().create_unix_server(self.guard, path, backlog=BACKLOG)
        os.chmod(path, 0o600)
        self._listeners.append(listener)
        self._unix_paths.append(path)

    @property
    def leads(self) -> bool:
        """Whether this process watches the import folder and sweeps lapsed seats: the first worker
        of a machine does it for the others (they learn of it through the database)."""
        return self.worker <= 1

    async def catch_up(self, fresh: bool = True) -> bool:
        """Take in what the other nodes committed since the last call; True once nothing is left.

        The feed gives final events only, below the horizon of transactions in flight anywhere on the
        PostgreSQL server, which one long transaction can hold back. With `fresh` (a request that must see
        what another node just committed: a report or a return under a key granted there, an import turn),
        the events committed above the horizon are taken in too, once the final ones are: following reads
        the rows again, so taking them in now and again when the horizon passes them is harmless, and the
        feed's position stays at the horizon."""
        assert self.services is not None and isinstance(self._store, PostgresStore)
        async with self._follow_lock:
            changes = await self._store.changes_since(self._followed)
            events = changes.events
            if fresh and not changes.more:
                events = events + await self._store.committed_after(changes.upto)
            if events:
                await self.services.ledger.follow(events)
            self._followed = changes.upto
            return not changes.more

    async def _follow(self) -> None:
        """Take in what the other nodes commit, every storage.follow_ms."""
        pause = self.config.storage.follow_ms / 1000
        while not self.stopping.is_set():
            try:
                caught_up = await self.catch_up(fresh=False)
            except Exception as e:  # the database is away: try again, the feed resumes where it stopped
                logs.event_limited("follow.failed", logs.logging.ERROR, error=str(e))
                caught_up = True
            if caught_up:
                try:
                    await asyncio.wait_for(self.stopping.wait(), timeout=pause)
                except TimeoutError:
                    pass

    def _room_elsewhere(self, items: set[str]) -> None:
        """Another node freed seats that waiters may be due: take its changes in, then serve."""
        async def catch_up_and_serve() -> None:
            try:
                while not await self.catch_up():
                    pass
            except Exception as e:  # the follower tries again every follow_ms; the queue check after it serves
                logs.event_limited("follow.failed", logs.logging.ERROR, error=str(e))
                return
            assert self.services is not None
            self.services.ledger.queue_check()

        if self.services is not None and not self.stopping.is_set():
            self._tasks.append(asyncio.ensure_future(catch_up_and_serve()))
            self._tasks = [t for t in self._tasks if not t.done()]

    async def _check_queues(self) -> None:
        assert self.services is not None
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=QUEUE_CHECK_SECONDS)
            self.services.ledger.queue_check()
            if self._queue_feed is not None:
                await self._queue_feed.check()

    @contextlib.asynccontextmanager
    async def _import_turn(self) -> AsyncIterator[None]:
        assert isinstance(self._store, PostgresStore)
        async with self._store.exclusive(IMPORT_LOCK):
            while not await self.catch_up():
                pass
            yield

    async def _sweeper(self) -> None:
        assert self.services is not None
        wait = SWEEP_SECONDS
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=wait)
            except TimeoutError:
                try:
                    freed = total = await self.services.ledger.sweep()
                    while freed == MAX_SWEEP:  # a mass expiry: go on in slices
                        freed = await self.services.ledger.sweep()
                        total += freed
                except Exception as e:  # the sweep was undone, lapsed seats are still due: try again soon
                    logs.event("seats.sweep_failed", logs.logging.ERROR, error=str(e), retry_seconds=SWEEP_RETRY_SECONDS)
                    wait = SWEEP_RETRY_SECONDS
                else:
                    wait = SWEEP_SECONDS
                    if total:
                        logs.event("seats.swept", freed=total)

    async def roll_up(self, wait: bool = True) -> int:
        """Fold every event written so far into the rollups; returns how many were folded. With wait=False
        (the background job), nothing while another node of a cluster holds the rollup lock (it is folding,
        pruning or converting): the events wait for the next run."""
        assert self.services is not None
        ledger, store = self.services.ledger, self.services.store
        async with self._rollup_lock:  # one roll-up at a time, so overuse is mirrored in order
            if not self._marks_converted:
                await self._convert_marks(store)
            return await self._roll_up_pages(ledger, store, self.services.alerts.after_usage, wait)

    async def _convert_marks(self, store: Store) -> None:
        """Convert the device marks an older release left (rollup_devices) before folding more events: a step
        of CONVERT_PAGE marks per transaction, so devices' commits wait little and a stop loses nothing."""
        if not await store.rollup_conversion():  # the usual case, read without the rollup lock: nothing to do
            self._marks_converted = True
            return
        total, logged = 0, time.monotonic()
        while done := await store.convert_marks(to_ms(self.clock()), CONVERT_PAGE):
            total += done
            if time.monotonic() - logged > 60:
                logged = time.monotonic()
                logs.event("rollups.converting", marks=total)
            await asyncio.sleep(0)
        if total:
            logs.event("rollups.converted", marks=total)
        self._marks_converted = True

    @staticmethod
    async def _roll_up_pages(ledger: Ledger, store: Store,
                             on_overuse: Callable[[list[str]], None] | None = None, wait: bool = True) -> int:
        total = 0
        # Items present when the pass starts are the only ones its events can name.
        quantities = {i.item_id: (i.license_type.value, i.quantity) for i in ledger.items.values()}
        while True:
            result = await store.roll_up(quantities, ROLLUP_PAGE, wait)
            total += result.processed
            if result.overuse:
                await ledger.mirror_overuse(result.overuse)
                if on_overuse is not None:
                    on_overuse(list(result.overuse))
            if result.processed < ROLLUP_PAGE:
                break
            await asyncio.sleep(0)
        # Borrowed devices count as active in every slice their borrow covers, offline as they are.
        while True:
            result = await store.count_borrowed_slices(to_ms(ledger.clock()), quantities, wait)
            if result.overuse:
                await ledger.mirror_overuse(result.overuse)
                if on_overuse is not None:
                    on_overuse(list(result.overuse))
            if result.processed < SLICES_PER_CALL:
                return total
            await asyncio.sleep(0)

    async def _roller(self) -> None:
        last_prune = 0.0
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=ROLLUP_SECONDS)
            except TimeoutError:
                try:
                    await self.roll_up(wait=False)
                    if time.monotonic() - last_prune > PRUNE_SECONDS:
                        last_prune = time.monotonic()
                        await self.prune_rollups(wait=False)
                except Exception as e:  # retried at the next tick; the event log is the truth
                    logs.event("rollups.failed", logs.logging.ERROR, error=str(e))

    async def prune_rollups(self, wait: bool = True) -> tuple[int, int]:
        """Drop the day rows of device marks no usage record can reach any more (31 days), and the counters
        past their tier ([stats] hourly_days for 3-minute and 2-hour buckets, daily_days for daily ones),
        PRUNE_PAGE rows per transaction. Returns (day rows, counter rows) deleted. With wait=False (the
        background job), nothing while another node of a cluster holds the rollup lock: the next run prunes."""
        assert self.services is not None
        store, stats = self.services.store, self.config.stats
        now_ms = to_ms(self.clock())
        marks = counters = 0
        while True:
            marks += (done := await store.prune_marks(now_ms // DAY_MS - MARKS_DAYS, PRUNE_PAGE, wait))
            if done < PRUNE_PAGE:
                break
            await asyncio.sleep(0)
        horizons = {size: now_ms - days * DAY_MS for size, days in
                    (("3m", stats.hourly_days), ("2h", stats.hourly_days), ("1d", stats.daily_days)) if days}
        while horizons:
            counters += (done := await store.prune_counters(horizons, PRUNE_PAGE, wait))
            if done < PRUNE_PAGE:
                break
            await asyncio.sleep(0)
        if marks or counters:
            logs.event("rollups.pruned", day_rows=marks, counters=counters)
        return marks, counters

    async def _archive_old_events(self, retain_days: int) -> None:
        """Every ARCHIVE_SECONDS, move device events older than retain_days into the archive folder."""
        assert self.services is not None
        archiver = self.services.archiver
        while not self.stopping.is_set():
            now = self.clock()
            try:
                await archiver.run(now - timedelta(days=retain_days), now)
            except Exception as e:  # retried at the next tick; nothing was lost (see archive.py)
                logs.event("events.archive_failed", logs.logging.ERROR, error=str(e))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=ARCHIVE_SECONDS)

    async def _check_main(self, session: aiohttp.ClientSession) -> None:
        assert self.services is not None
        url = f"{(self.config.server.standby_of or '').rstrip('/')}/healthz"
        try:
            async with session.get(url) as resp:
                up = resp.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            up = False
        if up != self.services.main_is_up:
            logs.event("standby.main_up" if up else "standby.serving", main=url)

        self.services.main_is_up = up

    async def _watch_main(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            await self._check_main(session)
            self._standby_checked.set()
            while not self.stopping.is_set():
                try:
                    await asyncio.wait_for(self.stopping.wait(), timeout=self.config.server.standby_check_seconds)
                except TimeoutError:
                    await self._check_main(session)

    async def reload(self) -> None:
        """SIGHUP: re-read the config file's [vendor] section and its key files, then rescan; and the [alerts]
        section, whose change retries the outbox at once.

        A change of trusted keys makes the rescan try every rejected file again.
        Other sections take effect at the next restart.
        """
        try:
            fresh = config_mod.load(self.config.source) if self.config.source else self.config
            keys = self.load_vendor_keys(fresh)
        except (config_mod.ConfigError, OSError, ValueError) as e:
            logs.event("reload.keys_failed", logs.logging.ERROR, error=str(e), kept=sorted(self.trusted))
        else:
            if set(keys) != set(self.trusted):
                logs.event("reload.keys_changed", added=sorted(set(keys) - set(self.trusted)),
                           removed=sorted(set(self.trusted) - set(keys)))
            self.config.vendor = fresh.vendor
            self.trusted = keys
            # [alerts] too (SMTP set up at last, say): a change retries the outbox now, not after its backoff.
            if self.services is not None and fresh is not self.config:
                smtp = fresh.alerts.smtp
                if self.services.alerts.reconfigure(fresh.alerts, fresh.path(smtp.password_file) if smtp.password_file
                                                    else None, fresh.path(smtp.ca_file) if smtp.ca_file else None):
                    self.config.alerts = fresh.alerts
                    logs.event("reload.alerts_changed", smtp_host=smtp.host)
                    await self.services.alerts.retry_now()
        if self.services is not None and self.leads:
            report = await self.services.importer.scan("reload")
            logs.event("reload.done", files=report.seen, changed=len(report.outcomes))

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, flush the ledger, close the database.

        Within server.shutdown_timeout whatever the database does, or STOP_GRACE after the last request
        when those took it all: what cannot finish by then (a commit to a database that went away, a
        connection asyncpg still counts as in use) is cut, and was never acknowledged to anyone."""
        loop = asyncio.get_running_loop()
        timeout = self.config.server.shutdown_timeout
        deadline = loop.time() + timeout

        def left() -> float:
            return max(deadline - loop.time(), 0.01)

        self.stopping.set()
        for listener in self._listeners:
            listener.close()  # stop accepting; open connections finish below
        if self._frames is not None:  # the front processes' handshakes being decided are answered
            await self._frames.close(timeout)
        if self.services is not None:
            self.services.ledger.stop_waiting()  # waiting requests get 503 now, not at the shutdown timeout
        if self.runner is not None:
            cleanup = asyncio.ensure_future(self.runner.cleanup())
            if not (await asyncio.wait([cleanup], timeout=timeout))[0]:
                # Requests still waiting, on commits or reads the database does not answer: stop the
                # ledger and the database now, so they end (503) instead of aiohttp waiting as long again.
                logs.event("server.stop_cut_requests", logs.logging.WARNING, seconds=timeout)
                if self.services is not None:
                    await self.services.ledger.close(0)
                if self._store is not None:
                    await self._store.close(0)
                await asyncio.wait([cleanup], timeout=STOP_GRACE)
        deadline = max(deadline, loop.time() + STOP_GRACE)
        if self.services is not None:
            try:
                await asyncio.wait_for(self.services.alerts.idle(), left())
            except TimeoutError:
                logs.event("alerts.stop_cut_delivery", logs.logging.WARNING)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            done, _ = await asyncio.wait(self._tasks, timeout=left())
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: a task that failed on its way out says so in the log itself
        if self.services is not None:
            await self.services.ledger.close(left())
            if self.services.clock is not None:  # what this process recorded last, for the next start
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.services.store.clock_tick(  # type: ignore[attr-defined]
                        self.services.clock.tick_ms()), max(0.1, min(5, left())))
        if self._queue_feed is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._queue_feed.close(), max(0.1, min(5, left())))
        if self._store is not None:
            await self._store.close(left())
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self._frames is not None:
            self._frames.release()
        if self._state_lock is not None:
            self._state_lock.release()
        logs.event("server.stopped")
