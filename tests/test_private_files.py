"""Backups and exports are written owner-only, whatever the umask (issue 22, item 6)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    ADMIN_PASSWORD,
    Vendor,
    admin_login,
    item,
    license_spec,
    start_daemon,
    stop_daemon,
    write_config,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _open_umask() -> None:
    os.umask(0o022)  # the usual umask: files come out 0644 unless the program says otherwise


@pytest.mark.slow
def test_backup_and_event_exports_are_owner_only(tmp_path: Path, vendor: Vendor) -> None:
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / "a.lic").write_bytes(vendor.issue(license_spec("L1", items=[item("L1-1")])))
    cfg = write_config(tmp_path, vendor)
    d = start_daemon(cfg, tmp_path)
    try:
        asyncio.run(admin_login(d.url))
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "LTS_ADMIN_PASSWORD": ADMIN_PASSWORD}
        ctl = [sys.executable, "-m", "lts_server.cli.ctl", "--server", d.url]
        assert subprocess.run([*ctl, "login"], env=env, capture_output=True).returncode == 0
        # Redirected standard output, as the README writes it.
        shell = f"{' '.join(ctl)} events export --format csv > {tmp_path / 'events.csv'}"
        assert subprocess.run(shell, shell=True, env=env, preexec_fn=_open_umask).returncode == 0
        assert _mode(tmp_path / "events.csv") == 0o600
        assert "import.imported" in (tmp_path / "events.csv").read_text()
        out = subprocess.run([*ctl, "events", "export", "--output", str(tmp_path / "events.ndjson")], env=env,
                             capture_output=True, preexec_fn=_open_umask)
        assert out.returncode == 0, out.stderr
        assert _mode(tmp_path / "events.ndjson") == 0o600
        # A backup while the daemon runs: the database and the identity, each 0600, in a 0700 folder.
        run = subprocess.run([sys.executable, "-m", "lts_server", "backup", "--config", str(cfg), "--to",
                              str(tmp_path / "backup")], capture_output=True, text=True, preexec_fn=_open_umask)
        assert run.returncode == 0, run.stderr
    finally:
        assert stop_daemon(d) == 0
    folder = tmp_path / "backup"
    assert _mode(folder) == 0o700
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["lts-server.sqlite3", "server-key.pem", "server-secret", "server-uuid"]
    assert all(_mode(folder / n) == 0o600 for n in names)
    con = sqlite3.connect(folder / "lts-server.sqlite3")
    assert con.execute("SELECT COUNT(*) FROM licenses").fetchone()[0] == 1
    con.close()
    assert (folder / "server-uuid").read_bytes() == (tmp_path / "state" / "server-uuid").read_bytes()
