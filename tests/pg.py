"""A throwaway PostgreSQL server for the tests: Debian's postgresql package, initdb in a temp folder.

initdb refuses to run as root, so as root the server runs as the `postgres`
system user the package creates. Without PostgreSQL the tests fail (they
never skip): `apt-get install postgresql` (.ci/run does it).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import asyncpg

_names = count(1)
# Every server's folder is a temp folder named so (folders() finds the ones a killed process left).
PREFIX = "lts-pg-"


@dataclass
class PgServer:
    folder: Path
    port: int
    bin: Path
    # Off for the tests (behaviour, not durability across power loss: SQLite's tests do that); on for the
    # benchmarks, which compare commits made as durable as SQLite's synchronous=FULL.
    fsync: bool = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://lts@127.0.0.1:{self.port}/{database}"

    async def new_database(self) -> str:
        """A fresh empty database; returns its URL."""
        name = f"test_{os.getpid()}_{next(_names)}"
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)

    def halt(self) -> None:
        """Stop the server (its data stays): the database goes away."""
        subprocess.run(_as_owner([str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast",
                                  "stop"]), capture_output=True)

    def launch(self) -> None:
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
                   f" -c fsync={'on' if self.fsync else 'off'} -c max_connections=300")
        subprocess.run(_as_owner([str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-o", options, "-l",
                                  str(self.folder / "log"), "-w", "start"]), check=True, capture_output=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not start; see {self.folder / 'log'}")

    def stop(self) -> None:
        subprocess.run(_as_owner([str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate",
                                  "stop"]), capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)


def _bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (the tests need initdb)")
    return Path(found[-1]).parent


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def start(fsync: bool = False) -> PgServer:
    binary = _bin()
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(_as_owner([str(binary / "initdb"), "-D", str(folder / "data"), "-U", "lts", "--auth=trust",
                              "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
    server = PgServer(folder, port, binary, fsync)
    try:
        server.launch()
    except Exception:
        server.stop()
        raise
    return server


def folders() -> set[Path]:
    """The folders of the servers start() made that are still there: running, or left by a process that was
    killed (pg_ctl starts a server in a session of its own, so it outlives its caller)."""
    return set(Path(tempfile.gettempdir()).glob(PREFIX + "*"))


def stop_folder(folder: Path) -> None:
    """Stop the server of a folder start() made, if it runs, and remove the folder."""
    PgServer(folder, 0, _bin()).stop()
