"""Moving old device events out of the log into compressed NDJSON files, without losing or doubling one.

The event log grows with every handshake (two rows a grant or refresh); the
statistics are kept in the rollups, so events the rollup job has folded can
leave the database once they are safely on disk elsewhere. A run:

1. finishes the runs an interruption left half done (archive rows without
   `done_ms`: their file is durable, some of their events may still be in
   the log), and removes files of this folder that no row names (written,
   but the run stopped before recording them: their events are all still
   in the log and are archived again);
2. reads the archivable events in order (store/sql.py `archive_horizon`:
   folded by the rollups, so final even on a cluster that commits in
   parallel; older than `before`, of a device type) into a
   `.partial` file, fsyncs it, renames it and fsyncs the folder;
3. records the file (`event_archives`), then deletes its events in
   transactions of DELETE_PAGE rows, then marks the row done.

So a crash at any point leaves every event either in the log or in a
recorded file (or both, until the next run deletes it from the log), never
in two recorded files. On PostgreSQL one node archives at a time (a
cluster-wide lock); each node writes into its own folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from lts_server import logs
from lts_server.core.times import iso, to_ms
from lts_server.store import StoredEvent
from lts_server.store.postgres import ARCHIVE_LOCK, PostgresStore
from lts_server.store.sql import ArchiveHorizon, ArchiveRow, Operations

# The fields of an exported event, in order: the admin API's event export and the archives share them.
EVENT_FIELDS = ("seq", "at", "type", "code", "itemId", "clientUuid", "product", "deploymentType", "result",
                "units", "instances", "detail")
READ_PAGE = 5_000
DELETE_PAGE = 5_000
FILE_EVENTS = 1_000_000  # events per archive file at most
SUFFIX = ".ndjson.gz"
# The names this module gives files (being written, and sealed); nothing else in the folder is touched.
OWN_NAME = re.compile(r"^events-\d{12}(\.partial|-\d{12}-\d{8}T\d{6}Z\.ndjson\.gz)$")

T = TypeVar("T")


class ArchiveUnwritable(Exception):
    """The archive folder cannot be read or written (full, read-only, missing): the run stopped before
    deleting any event it had not recorded in a durable file."""


def event_values(stored: StoredEvent) -> tuple[Any, ...]:
    e = stored.event
    return (stored.seq, iso(e.at), e.type, e.code, e.item_id, e.client_uuid, e.product, e.deployment_type, e.result,
            e.units, e.instances, e.detail)


def archive_line(stored: StoredEvent) -> str:
    """One event as a line of NDJSON, the same as GET /api/v1/admin/events writes it."""
    return json.dumps(dict(zip(EVENT_FIELDS, event_values(stored))), separators=(",", ":")) + "\n"


@dataclass
class ArchiveReport:
    files: list[ArchiveRow] = field(default_factory=list)
    events: int = 0
    # Interrupted runs finished first, and the events they still had to delete.
    resumed: int = 0
    resumed_events: int = 0


class Archiver:
    """Archives the event log of one store into one folder; one run at a time (per process and cluster)."""

    def __init__(self, store: Operations, folder: Path) -> None:
        self.store = store
        self.folder = folder
        self._running = asyncio.Lock()

    async def run(self, before: datetime, now: datetime) -> ArchiveReport:
        async with self._running, self._exclusive():
            report = ArchiveReport()
            await self._on_disk(self.folder.mkdir, parents=True, exist_ok=True, mode=0o700)
            await self._recover(report, now)
            before_ms = to_ms(before)
            horizon = await self.store.archive_horizon(before_ms)
            after = 0
            while True:
                row, after = await self._write_file(after, horizon, before_ms, now)
                if row is None:
                    break
                report.events += await self._delete(row, now)
                report.files.append(row)
            if report.files or report.resumed:
                logs.event("events.archived", files=[r.path for r in report.files], events=report.events,
                           resumed=report.resumed, before=iso(before))
            return report

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """On PostgreSQL, the whole run under a cluster-wide lock: one node archives at a time."""
        if not isinstance(self.store, PostgresStore):
            yield
            return
        async with self.store.exclusive(ARCHIVE_LOCK):
            yield

    async def _recover(self, report: ArchiveReport, now: datetime) -> None:
        rows = await self.store.event_archives()
        for row in rows:
            if row.done_ms is None:
                report.resumed += 1
                report.resumed_events += await self._delete(row, now)
        named = {row.path for row in rows}
        for leftover in await self._on_disk(self._unrecorded, named):
            # Its events never left the log (no row, so no delete): archived again by this run.
            await self._on_disk(leftover.unlink)
            logs.event("events.archive_leftover_removed", path=str(leftover))

    async def _on_disk(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn` on a thread; an OSError of the folder's comes out as ArchiveUnwritable, saying which and why."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except OSError as e:
            raise ArchiveUnwritable(f"the archive folder {self.folder} cannot be written: {e.strerror or e}; "
                                    "every event is still in the database or in a durable archive file; "
                                    "free space (or fix the folder's permissions), then retry") from e

    def _unrecorded(self, named: set[str]) -> list[Path]:
        return [p for p in self.folder.iterdir() if OWN_NAME.match(p.name) and str(p) not in named]

    async def _write_file(self, after: int, horizon: ArchiveHorizon, before_ms: int,
                          now: datetime) -> tuple[ArchiveRow | None, int]:
        """The next file of up to FILE_EVENTS events after `after`, durable and recorded; None when none is left."""
        page = await self.store.archivable_page(after, horizon, before_ms, READ_PAGE)
        if not page:
            return None, after
        first = page[0].seq
        partial = self.folder / f"events-{first:012d}.partial"
        out = await self._on_disk(_open, partial)
        count = 0
        try:
            while page:
                await self._on_disk(_write, out, page)
                count += len(page)
                after = page[-1].seq
                if count >= FILE_EVENTS:
                    break
                page = await self.store.archivable_page(after, horizon, before_ms, READ_PAGE)
            final = self.folder / f"events-{first:012d}-{after:012d}-{now.strftime('%Y%m%dT%H%M%SZ')}{SUFFIX}"
            size = await self._on_disk(_seal, out, partial, final)
        except BaseException:
            # Not left behind on a full disk (the next run would remove it, but it holds space till then).
            await asyncio.to_thread(_discard, out, partial)
            raise
        row = await self.store.record_archive(str(final), first, after, before_ms, count, size, to_ms(now), horizon)
        return row, after

    async def _delete(self, row: ArchiveRow, now: datetime) -> int:
        deleted = 0
        while n := await self.store.delete_archived(row, DELETE_PAGE):
            deleted += n
        await self.store.finish_archive(row.id, to_ms(now))
        return deleted


def _open(path: Path) -> IO[bytes]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    return os.fdopen(fd, "wb")


def _write(out: IO[bytes], page: list[StoredEvent]) -> None:
    # One gzip member per page: a valid gzip file (members concatenate), and no state kept between pages.
    out.write(gzip.compress("".join(archive_line(e) for e in page).encode(), compresslevel=6))


def _discard(out: IO[bytes], partial: Path) -> None:
    with contextlib.suppress(OSError):  # closing flushes the buffer: on a full disk that fails too
        out.close()
    with contextlib.suppress(OSError):
        partial.unlink(missing_ok=True)


def _seal(out: IO[bytes], partial: Path, final: Path) -> int:
    """Flush the file to disk, give it its final name, and make the name durable; returns its size."""
    out.flush()
    os.fsync(out.fileno())
    size = out.tell()
    out.close()
    os.replace(partial, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return size
