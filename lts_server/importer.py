"""The import directory: finds *.lic files, verifies them, and hands them to the ledger.

Runs at start-up, on every change the watcher sees, every rescan_seconds, on
SIGHUP, and for uploads. Scans never overlap; a file whose bytes did not
change since it was last seen is skipped, so a rescan records nothing new -
except that rejected files are tried again whenever the trusted vendor keys
differ from the last scan's (at start-up and after SIGHUP).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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
            for path in paths:
                known = self.ledger.imports.get(str(path))
                if known is not None and known.state == "rejected" and retry_rejected:
                    known = None
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
            licensefile.check_binding(verified.license, self.server_uuid, self._allow_unbound(), self.server_key)
        except licensefile.LicenseFileError as e:
            outcome = await self.ledger.record_import(path, sha256, None, "", "", str(e))
        else:
            outcome = await self.ledger.record_import(
                path, sha256, verified.license, verified.key_id, verified.text, None, verified.binding
            )
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

    async def _timer(self, stop: asyncio.Event, seconds: float) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=seconds)
            except TimeoutError:
                await self.scan("timer")
