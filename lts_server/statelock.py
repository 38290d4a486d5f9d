"""A lock on the state folder: every daemon holds it shared; `lts-server migrate` takes it alone.

So migrate refuses to copy a database that a running daemon is still changing, and a daemon does not start
on a state folder that is being migrated. It is an advisory flock on `<state_dir>/lts-server.lock`: the
kernel drops it when the process ends, however it ends, so it never needs cleaning up.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "lts-server.lock"


class StateBusy(Exception):
    """Someone else holds the state folder in a way that excludes us; the message says who and what to do."""


class StateLock:
    def __init__(self, state_dir: Path, name: str = LOCK_NAME) -> None:
        self.path = state_dir / name
        self._fd: int | None = None

    def _take(self, mode: int) -> bool:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def share(self) -> None:
        """A daemon's hold (any number of daemons share it)."""
        if not self._take(fcntl.LOCK_SH):
            self.release()
            raise StateBusy(f"{self.path.parent} is being migrated (lts-server migrate holds {self.path}); "
                            "start the daemon once the migration is done")

    def exclusive(self, busy: str | None = None) -> None:
        """A hold no one else may have: migrate's (refused while any daemon runs on the folder), or, on a lock
        of another name, the SQLite writer's. `busy`: what the refusal says instead of migrate's message."""
        if not self._take(fcntl.LOCK_EX):
            self.release()
            raise StateBusy(busy or f"a daemon is running on {self.path.parent} (it holds {self.path}): stop it "
                                    "first (systemctl stop lts-server), so that nothing it writes after the copy "
                                    "is lost")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
