"""ltsctl end to end against a running daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import subprocess
import sys
import time
import urllib.request
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


def test_devices_list_reads_every_page_of_an_item(daemon: Daemon) -> None:
    """An operator's test found `devices list` silent after the API's first page (1,000 seats of 4,647)."""
    ok(daemon, "login", "--setup")
    for n in range(11):  # the item's 10 seats and its grace
        req = urllib.request.Request(daemon.url + "/api/v1/handshake", method="POST", headers={
            "Content-Type": "application/json"}, data=json.dumps({
                "handshakeCode": "216998-L1", "clientUuid": f"dev-{n:02d}", "product": "barcode-reader",
                "deploymentType": "browser"}).encode())
        assert urllib.request.urlopen(req).status == 200
    for page in ("3", "11", "10000"):
        listed = json.loads(ok(daemon, "--json", "devices", "list", "L1-1", "--page", page))
        assert sorted(d["clientUuid"] for d in listed) == [f"dev-{n:02d}" for n in range(11)], page
    assert ok(daemon, "devices", "list", "L1-1", "--page", "4").count("dev-") == 11
    refused = ctl(daemon, "devices", "list", "L1-1", "--page", "0")
    assert refused.returncode == 2 and "from 1 to 10,000" in refused.stderr


def test_ltsctl_wrong_password_and_unreachable_server(daemon: Daemon) -> None:
    assert ctl(daemon, "login", "--setup").returncode == 0
    wrong = ctl(daemon, "login", password="not the password")
    assert wrong.returncode == 3 and "wrong password" in wrong.stderr
    env = {**os.environ, "XDG_CONFIG_HOME": str(daemon.folder / "xdg")}
    down = subprocess.run([sys.executable, "-m", "lts_server.cli.ctl", "--server", "http://127.0.0.1:9",
                           "status"], capture_output=True, text=True, timeout=60, env=env)
    assert down.returncode != 0 and "ltsctl:" in down.stderr


def _bare(d: Daemon, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    """ltsctl with no terminal and no LTS_ADMIN_PASSWORD, as from cron or a pipe."""
    full = {k: v for k, v in os.environ.items() if k != "LTS_ADMIN_PASSWORD"}
    full.update({"XDG_CONFIG_HOME": str(d.folder / "xdg"), **env})
    return subprocess.run([sys.executable, "-m", "lts_server.cli.ctl", *args], capture_output=True, text=True,
                          timeout=60, env=full, input=stdin)


def test_login_without_a_terminal_or_password_says_what_to_do(daemon: Daemon) -> None:
    out = _bare(daemon, "--server", daemon.url, "login", "--setup")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "LTS_ADMIN_PASSWORD" in out.stderr and "--password-file" in out.stderr


def test_login_reads_the_password_from_a_file_or_stdin(daemon: Daemon, tmp_path: Path) -> None:
    secret = tmp_path / "admin-password"
    secret.write_text(ADMIN_PASSWORD + "\n")
    assert _bare(daemon, "--server", daemon.url, "login", "--setup", "--password-file", str(secret)).returncode == 0
    out = _bare(daemon, "--server", daemon.url, "login", "--password-file", "-", stdin=ADMIN_PASSWORD)
    assert out.returncode == 0 and "logged in" in out.stdout


def test_server_without_a_scheme_means_http(daemon: Daemon) -> None:
    host_port = daemon.url.removeprefix("http://")
    assert ctl(daemon, "login", "--setup").returncode == 0
    out = _bare(daemon, "--server", host_port, "login", LTS_ADMIN_PASSWORD=ADMIN_PASSWORD)
    assert out.returncode == 0, out.stderr
    assert "server UUID" in _bare(daemon, "--server", host_port, "status").stdout
    wrong = _bare(daemon, "--server", "ftp://" + host_port, "status")
    assert wrong.returncode == 2 and "http://" in wrong.stderr


def test_every_command_has_help_text() -> None:
    from lts_server.cli.ctl import parser

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, child in action.choices.items():
                    assert helps.get(name), f"`{path} {name}` has no help text"
                    walk(child, f"{path} {name}")
            elif action.dest != "help":
                assert action.help, f"`{path}` argument {action.dest} has no help text"

    walk(parser(), "ltsctl")


def test_imports_lists_files_and_rejection_reasons(daemon: Daemon) -> None:
    (daemon.folder / "import" / "broken.lic").write_text("not a license\n")
    assert ctl(daemon, "login", "--setup").returncode == 0
    subprocess.run(["kill", "-HUP", str(daemon.proc.pid)], check=True)  # rescan
    deadline = time.monotonic() + 10
    while "broken.lic" not in (listing := ok(daemon, "imports")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "a.lic" in listing and "imported" in listing and "rejected" in listing
    rejected = json.loads(ok(daemon, "--json", "imports", "--rejected"))
    assert [f["path"].rsplit("/", 1)[1] for f in rejected] == ["broken.lic"] and rejected[0]["reason"]


def test_session_password_from_a_file_keeps_it_off_the_command_line(daemon: Daemon, tmp_path: Path) -> None:
    assert ctl(daemon, "login", "--setup").returncode == 0
    secret = tmp_path / "session-password"
    secret.write_text("s3cret-pass\n")
    ok(daemon, "codes", "create", "216998", "fleet", "--items", "L1-1", "--password-file", str(secret))
    assert json.loads(ok(daemon, "--json", "codes", "show", "216998-fleet"))["passwordSet"]

    def handshake(password: str) -> int:
        req = urllib.request.Request(daemon.url + "/api/v1/handshake", method="POST", headers={
            "Content-Type": "application/json"}, data=json.dumps({
                "handshakeCode": "216998-fleet", "clientUuid": "d1", "product": "barcode-reader",
                "deploymentType": "browser", "sessionPassword": password}).encode())
        try:
            return urllib.request.urlopen(req).status
        except urllib.error.HTTPError as e:
            return e.code

    assert handshake("s3cret-pass") == 200 and handshake("s3cret-pass\n") == 403


def test_deleting_a_default_code_needs_confirmation_and_can_be_undone(daemon: Daemon) -> None:
    assert ctl(daemon, "login", "--setup").returncode == 0
    refused = ctl(daemon, "codes", "delete", "216998-L1")
    assert refused.returncode == 1 and "default code" in refused.stderr and "--confirm-default" in refused.stderr
    assert "216998-L1" in ok(daemon, "codes", "list")
    assert "restore-default L1" in ok(daemon, "codes", "delete", "216998-L1", "--confirm-default")
    assert "216998-L1" not in ok(daemon, "codes", "list")
    assert "restored 216998-L1 with items L1-1, L1-2" in ok(daemon, "codes", "restore-default", "L1")
    shown = json.loads(ok(daemon, "--json", "codes", "show", "216998-L1"))
    assert shown["default"] and shown["items"] == ["L1-1", "L1-2"]
    again = ctl(daemon, "codes", "restore-default", "L1")
    assert again.returncode == 1 and "409" in again.stderr


def test_dates_with_a_plus_offset_reach_the_server_intact(daemon: Daemon) -> None:
    assert ctl(daemon, "login", "--setup").returncode == 0
    assert "216998-L1" in ok(daemon, "stats", "216998-L1", "--since", "2026-01-01T00:00:00+01:00")
    out = ok(daemon, "events", "export", "--since", "2026-01-01T00:00:00+01:00", "--type", "code.created")
    assert [json.loads(line)["code"] for line in out.splitlines()] == ["216998-L1"]


def test_events_archive_moves_nothing_recent_and_lists_its_files(daemon: Daemon) -> None:
    ok(daemon, "login", "--setup")
    # A fresh server's events are all recent: nothing is old enough to leave the database.
    out = json.loads(ok(daemon, "--json", "events", "archive", "--before", "2026-01-01T00:00:00Z"))
    assert (out["events"], out["files"]) == (0, [])
    assert "archived 0 events into 0 file(s)" in ok(daemon, "events", "archive", "--before", "2026-01-01T00:00:00Z")
    assert json.loads(ok(daemon, "--json", "events", "archives")) == []
    too_recent = ctl(daemon, "events", "archive", "--before", "2999-01-01T00:00:00Z")
    assert too_recent.returncode == 1 and "less than an hour ago" in too_recent.stderr
