"""`lts-server migrate` does not copy a live database, refuses a non-empty target unless --force, and verifies
the counts it copied (issue 22, item 4)."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from lts_server.migrate import snapshot
from tests.conftest import Vendor, item, license_spec, query_database, start_daemon, stop_daemon, write_config


def _migrate(cfg: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lts_server", "migrate", "--config", str(cfg), "--to", url, *extra],
                          capture_output=True, text=True, timeout=120)


async def _grants(url: str, n: int) -> None:
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            body = {"handshakeCode": "216998-P", "clientUuid": f"m{i}", "product": "barcode-reader",
                    "deploymentType": "browser"}
            async with s.post(f"{url}/api/v1/handshake", json=body) as resp:
                assert resp.status == 200


def test_migrate_refuses_a_live_daemon_then_copies_and_verifies(tmp_path: Path, vendor: Vendor,
                                                                pg_server: Any) -> None:
    url = asyncio.run(pg_server.new_database())
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / "p.lic").write_bytes(vendor.issue(license_spec("P", items=[item("p1", quantity=50)])))
    cfg = write_config(tmp_path, vendor)
    d = start_daemon(cfg, tmp_path)
    try:
        asyncio.run(_grants(d.url, 4))
        live = _migrate(cfg, url)
        assert live.returncode == 1
        assert "a daemon is running" in live.stderr and "stop it first" in live.stderr
        # Refused before anything was written: the target has not even a schema.
        assert asyncio.run(query_database(url, "SELECT to_regclass('licenses')"))[0][0] is None
    finally:
        assert stop_daemon(d) == 0
    events = sqlite3.connect(tmp_path / "state" / "lts-server.sqlite3").execute(
        "SELECT COUNT(*) FROM events").fetchone()[0]
    done = _migrate(cfg, url)
    assert done.returncode == 0, done.stderr
    verified = next(line for line in done.stdout.splitlines() if line.startswith("verified:"))
    assert f"licenses 1, seats 4, events {events:,}" in verified
    assert not (tmp_path / "state" / "migrate-snapshot.sqlite3").exists()  # the snapshot is removed
    again = _migrate(cfg, url)
    assert again.returncode == 1 and "not empty" in again.stderr and "--force" in again.stderr
    # --force replaces what the target holds: the counts are the source's, not doubled.
    d = start_daemon(cfg, tmp_path)
    asyncio.run(_grants(d.url, 6))
    assert stop_daemon(d) == 0
    forced = _migrate(cfg, url, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "--force: emptied" in forced.stdout
    assert asyncio.run(query_database(url, "SELECT COUNT(*) FROM seats"))[0][0] == 6
    assert asyncio.run(query_database(url, "SELECT COUNT(*) FROM licenses"))[0][0] == 1


def test_the_snapshot_is_consistent_and_owner_only(tmp_path: Path) -> None:
    db = tmp_path / "live.sqlite3"
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("CREATE TABLE t (n INTEGER)")
    con.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
    con.commit()
    con.execute("BEGIN")
    con.execute("INSERT INTO t VALUES (-1)")  # not committed: not in the snapshot
    out = tmp_path / "snap.sqlite3"
    snapshot(db, out)
    con.rollback()
    con.close()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sqlite3.connect(out).execute("SELECT COUNT(*), MIN(n) FROM t").fetchone() == (1000, 0)
