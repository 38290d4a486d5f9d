"""The import directory: finds *.lic files, verifies them, and hands them to the ledger.

Runs at start-up, on every change the watcher sees, every rescan_seconds, on
SIGHUP, and for uploads. Scans never overlap; a file whose bytes did not
change since it was last seen is skipped, so a rescan records nothing new -
except that rejected files are tried again whenever the trusted vendor keys
differ from the last scan's (at start-up and after SIGHUP).

A file still being written is not verified: only once it is settled - renamed
into place after its last write (its ctime is past its mtime), or unchanged for
`import.settle_ms` - so a half-copied file raises no false alarm. A rescan is
scheduled for when the waiting files will have settled. A rejected file that is
deleted from the folder stops being a rejection (event import.removed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import watchfiles
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lts_server import licensefile, logs
from lts_server.ledger import ImportOutcome, Ledger

SUFFIX = ".lic"


@dataclass(frozen=True)
class ScanReport:
    seen: int
    outcomes: dict[str, ImportOutcome]


class Importer:
    def __init__(
        self,
        ledger: Ledger,
        directory: Path,
        server_uuid: str,
        trusted: Callable[[], dict[str, Ed25519PublicKey]],
        allow_unbound: Callable[[], bool],
        turn: Callable[[], AbstractAsyncContextManager[None]] = contextlib.nullcontext,
        settle_ms: int = 2000,
        server_key: str | None = None,
    ) -> None:
        self.ledger = ledger
        self.directory = directory
        self.server_uuid = server_uuid
        # This server's identity key (base64): a file bound to another key is rejected (wrong-server-key).
        self.server_key = server_key
        self._trusted = trusted
        self._allow_unbound = allow_unbound
        # Held while importing: on a cluster, one node at a time, after taking in the others' imports,
        # so a file dropped on every node imports once.
        self._turn = turn
        self._lock = asyncio.Lock()
        self.last_scan_error: str | None = None
        # The trusted key ids of the last scan: when they change (SIGHUP, restart), rejected files are retried.
        self._keys_seen: frozenset[str] | None = None
        # Told every recorded import's outcome (alerts check at once; metrics count results).
        self.on_import: Callable[[ImportOutcome], None] | None = None
        self.settle_ns = settle_ms * 1_000_000
        # Files seen still changing: path -> ((size, mtime_ns), when first seen so, monotonic ns).
        self._unsettled: dict[str, tuple[tuple[int, int], int]] = {}
        self._settle_timer: asyncio.TimerHandle | None = None
        self._settle_scan: asyncio.Task[ScanReport] | None = None

    def _settled(self, path: Path) -> bool | None:
        """Whether the file is done being written (None: it went away)."""
        try:
            st = path.stat()
        except OSError:
            return None
        shape = (st.st_size, st.st_mtime_ns)
        now = time.monotonic_ns()
        # Renamed (or linked) into place after its last write; or its last write is settle_ms old.
        if st.st_ctime_ns > st.st_mtime_ns or time.time_ns() - st.st_mtime_ns >= self.settle_ns:
            self._unsettled.pop(str(path), None)
            return True
        seen = self._unsettled.get(str(path))
        if seen is None or seen[0] != shape:
            self._unsettled[str(path)] = (shape, now)
            return False
        # The same size and mtime for settle_ms (a clock that put the mtime ahead of ours).
        return now - seen[1] >= self.settle_ns

    def _rescan_when_settled(self) -> None:
        if not self._unsettled or self._settle_timer is not None:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._settle_timer = None
            self._settle_scan = loop.create_task(self.scan("settled"))

        self._settle_timer = loop.call_later(self.settle_ns / 1e9 + 0.05, fire)

    def stop(self) -> None:
        """Cancel a scheduled rescan (the server is stopping)."""
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._settle_timer = None

    async def scan(self, reason: str = "rescan") -> ScanReport:
        async with self._lock, self._turn():
            try:
                paths = sorted(p for p in self.directory.iterdir() if p.suffix == SUFFIX and p.is_file())
            except OSError as e:
                self.last_scan_error = f"cannot list {self.directory}: {e.strerror}"
                logs.event("import.scan_failed", logs.logging.ERROR, directory=str(self.directory),
                           error=self.last_scan_error)
                return ScanReport(0, {})
            self.last_scan_error = None
            keys = frozenset(self._trusted())
            retry_rejected = keys != self._keys_seen
            outcomes = {}
            listed = {str(p) for p in paths}
            gone = [r.path for r in self.ledger.imports.values() if r.state in ("rejected", "dismissed")
                    and not r.path.startswith("upload:") and Path(r.path).parent == self.directory
                    and r.path not in listed]
            if gone and await self.ledger.clear_removed(gone):
                logs.event("import.rejections_removed", paths=gone)
            self._unsettled = {p: v for p, v in self._unsettled.items() if p in listed}
            for path in paths:
                known = self.ledger.imports.get(str(path))
                if known is not None and (known.state == "removed" or (known.state == "rejected" and retry_rejected)):
                    known = None
                settled = self._settled(path)
                if not settled:
                    if settled is False:
                        logs.event("import.waiting", logs.logging.DEBUG, path=str(path),
                                   settle_ms=self.settle_ns // 1_000_000)
                    continue
                try:
                    data = await asyncio.to_thread(path.read_bytes)
                except OSError as e:
                    logs.event("import.unreadable", logs.logging.WARNING, path=str(path), error=e.strerror)
                    continue
                if known is not None and known.sha256 == hashlib.sha256(data).hexdigest():
                    continue
                outcome = await self._import(str(path), data)
                if outcome.recorded:
                    outcomes[str(path)] = outcome
            self._keys_seen = keys
            self._rescan_when_settled()
            if outcomes:
                logs.event("import.scan", reason=reason, files=len(paths), changed=len(outcomes))
            return ScanReport(len(paths), outcomes)

    async def import_bytes(self, path: str, data: bytes) -> ImportOutcome:
        """Verify and import one file's bytes (an upload)."""
        async with self._turn():
            return await self._import(path, data)

    async def _import(self, path: str, data: bytes) -> ImportOutcome:
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            verified = licensefile.verify(data, self._trusted())
        except licensefile.LicenseFileError as e:
            outcome = await self.ledger.record_import(path, sha256, None, "", "", str(e))
        else:
            try:
                licensefile.check_binding(verified.license, self.server_uuid, self._allow_unbound(), self.server_key)
                rejection = None
            except licensefile.LicenseFileError as e:  # signed, but not for here: the rejection names the license
                rejection = str(e)
            outcome = await self.ledger.record_import(path, sha256, verified.license, verified.key_id,
                                                      verified.text, rejection,
                                                      verified.binding if rejection is None else None)
        if outcome.recorded:
            logs.event(
                f"import.{outcome.state}",
                logs.logging.WARNING if outcome.state == "rejected" else logs.logging.INFO,
                path=path, sha256=sha256, license_id=outcome.license_id, reason=outcome.reason,
            )
            if self.on_import is not None:
                self.on_import(outcome)
        return outcome

    async def watch(self, stop: asyncio.Event, rescan_seconds: float, use_inotify: bool = True) -> None:
        """Rescan on changes and on a timer until stop is set."""
        timer = asyncio.create_task(self._timer(stop, rescan_seconds))
        try:
            if use_inotify:
                try:
                    async for _changes in watchfiles.awatch(
                        self.directory, stop_event=stop, recursive=False, debounce=500,
                        watch_filter=lambda _change, p: p.endswith(SUFFIX),
                    ):
                        await self.scan("changed")
                except (OSError, RuntimeError) as e:
                    logs.event("import.watch_unavailable", logs.logging.WARNING, error=str(e),
                               fallback=f"polling every {rescan_seconds}s")
            await stop.wait()
        finally:
            timer.cancel()
            self.stop()

    async def _timer(self, stop: asyncio.Event, seconds: float) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=seconds)
            except TimeoutError:
                await self.scan("timer")
