"""ltsctl end to end against a running daemon."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    ADMIN_PASSWORD,
    Daemon,
    Vendor,
    item,
    license_spec,
    start_daemon,
    stop_daemon,
    storage_section,
    write_config,
)


@pytest.fixture
def daemon(request: pytest.FixtureRequest, backend: str, tmp_path: Path, vendor: Vendor) -> Iterator[Daemon]:
    """The daemon as a process, on each backend."""
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / "a.lic").write_bytes(vendor.issue(license_spec("L1", items=[item("L1-1"), item("L1-2")])))
    storage = asyncio.run(storage_section(request, backend, tmp_path))
    d = start_daemon(write_config(tmp_path, vendor, storage=storage), tmp_path)
    yield d
    assert stop_daemon(d) == 0


def ctl(d: Daemon, *args: str, password: str = ADMIN_PASSWORD, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CONFIG_HOME": str(d.folder / "xdg"), "LTS_ADMIN_PASSWORD": password}
    return subprocess.run([sys.executable, "-m", "lts_server.cli.ctl", "--server", d.url, *args],
                          capture_output=True, text=True, timeout=60, env=env, input=stdin)


def ok(d: Daemon, *args: str) -> str:
    out = ctl(d, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_ltsctl_end_to_end(daemon: Daemon, vendor: Vendor, tmp_path: Path) -> None:
    not_logged_in = ctl(daemon, "status")
    assert not_logged_in.returncode == 3 and "not logged in" in not_logged_in.stderr
    assert "logged in" in ok(daemon, "login", "--setup")
    tokens = tmp_path / "xdg" / "lts-server" / "tokens.json"
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    status = json.loads(ok(daemon, "--json", "status"))
    assert status["counts"]["licenses"] == 1
    assert "server UUID" in ok(daemon, "status")

    lic = tmp_path / "b.lic"
    lic.write_bytes(vendor.issue(license_spec("L2", items=[item("L2-1", product="viewer")])))
    assert "imported" in ok(daemon, "licenses", "import", str(lic))
    assert "L2" in ok(daemon, "licenses", "list")
    bad = tmp_path / "bad.lic"
    bad.write_bytes(lic.read_bytes().replace(b'"quantity": 10', b'"quantity": 11'))
    failed = ctl(daemon, "licenses", "import", str(bad))
    assert failed.returncode == 1 and "bad-signature" in failed.stderr

    ok(daemon, "codes", "create", "216998", "fleet", "--items", "L1-1,L1-2", "--password", "s3cret-pass")
    shown = json.loads(ok(daemon, "--json", "codes", "show", "216998-fleet"))
    assert shown["passwordSet"] and shown["items"] == ["L1-1", "L1-2"]
    assert "(custom)" in ok(daemon, "codes", "order", "216998-fleet", "L1-2", "L1-1")
    assert "(default)" in ok(daemon, "codes", "order", "216998-fleet", "--default")
    ok(daemon, "codes", "edit", "216998-fleet", "--no-password", "--domains", "*.example.com")
    assert "216998-fleet" in ok(daemon, "codes", "list")
    dup = ctl(daemon, "codes", "create", "216998", "fleet")
    assert dup.returncode == 1 and "already exists" in dup.stderr

    import urllib.request

    req = urllib.request.Request(daemon.url + "/api/v1/handshake", method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps({
            "handshakeCode": "216998-fleet", "clientUuid": "truck-7", "product": "barcode-reader",
            "deploymentType": "browser", "domain": "gps.example.com"}).encode())
    assert json.loads(urllib.request.urlopen(req).read())["authorization"]["itemId"] == "L1-1"
    devices = json.loads(ok(daemon, "--json", "devices", "list", "L1-1"))
    assert [d["clientUuid"] for d in devices] == ["truck-7"]
    items = json.loads(ok(daemon, "--json", "items", "list"))
    assert next(i for i in items if i["itemId"] == "L1-1")["seats"]["used"] == 1
    assert "revoked" in ok(daemon, "items", "revoke", "L1-2")
    assert "active" in ok(daemon, "items", "restore", "L1-2")
    ok(daemon, "devices", "release", "L1-1", "truck-7")
    assert json.loads(ok(daemon, "--json", "devices", "list", "L1-1")) == []

    export = ok(daemon, "events", "export", "--type", "handshake")
    assert [json.loads(line)["clientUuid"] for line in export.splitlines()] == ["truck-7"]
    csv_out = ok(daemon, "events", "export", "--format", "csv", "--code", "216998-fleet")
    assert csv_out.splitlines()[0].startswith("seq,at,type")
    assert "216998-fleet" in ok(daemon, "stats", "216998-fleet")
    ok(daemon, "codes", "delete", "216998-fleet")
    missing = ctl(daemon, "codes", "show", "216998-fleet")
    assert missing.returncode == 1 and "404" in missing.stderr
    assert "logged out" in ok(daemon, "logout")
    assert ctl(daemon, "status").returncode == 3


def test_ltsctl_wrong_password_and_unreachable_server(daemon: Daemon) -> None:
    assert ctl(daemon, "login", "--setup").returncode == 0
    wrong = ctl(daemon, "login", password="not the password")
    assert wrong.returncode == 3 and "wrong password" in wrong.stderr
    env = {**os.environ, "XDG_CONFIG_HOME": str(daemon.folder / "xdg")}
    down = subprocess.run([sys.executable, "-m", "lts_server.cli.ctl", "--server", "http://127.0.0.1:9",
                           "status"], capture_output=True, text=True, timeout=60, env=env)
    assert down.returncode != 0 and "ltsctl:" in down.stderr
