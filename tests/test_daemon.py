"""The daemon as systemd runs it: notifications, signals, health endpoints, logs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    UNDER_CI,
    Vendor,
    admin_login,
    item,
    license_spec,
    make_vendor,
    start_daemon,
    stop_daemon,
    unavailable,
    write_config,
)


def get(url: str, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_readiness(tmp_path: Path, vendor: Vendor) -> None:
    d = start_daemon(write_config(tmp_path, vendor), tmp_path)
    try:
        assert get(f"{d.url}/healthz") == (200, {"status": "ok"})
        assert get(f"{d.url}/readyz") == (200, {"status": "ready"})
    finally:
        assert stop_daemon(d) == 0


def test_sd_notify_ready_watchdog_stopping(tmp_path: Path, vendor: Vendor) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(15)
    d = start_daemon(write_config(tmp_path, vendor), tmp_path,
                     env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}, wait=False)
    try:
        messages: list[str] = []
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=listening on http://127.0.0.1:" in ready
        # The socket is bound by the time READY=1 is sent.
        port = int(ready.rsplit(":", 1)[1].split()[0])
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        # WATCHDOG=1 at half the interval: several in a second.
        deadline = time.monotonic() + 1.5
        pings = 0
        while time.monotonic() < deadline:
            if "WATCHDOG=1" in sock.recv(4096).decode():
                pings += 1
        assert pings >= 3
        d.proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in sock.recv(4096).decode():
            pass
        assert d.proc.wait(15) == 0
    finally:
        sock.close()
        if d.proc.poll() is None:
            d.proc.kill()


@pytest.mark.sqlite_only  # the SQLite file, its lock or the key files in the state folder
def test_sigterm_lets_an_in_flight_request_finish(tmp_path: Path, vendor: Vendor) -> None:
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / "a.lic").write_bytes(vendor.issue(license_spec("L1", items=[item("L1-1")])))
    d = start_daemon(write_config(tmp_path, vendor), tmp_path)
    port = int(d.url.rsplit(":", 1)[1])
    # Another process holds the write lock, so the handshake's commit waits: the
    # request is in flight when SIGTERM arrives.
    blocker = sqlite3.connect(tmp_path / "state" / "lts-server.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    body = json.dumps({"handshakeCode": "216998-L1", "clientUuid": "dev-inflight", "product": "barcode-reader",
                       "deploymentType": "browser"}).encode()
    conn = socket.create_connection(("127.0.0.1", port), timeout=15)
    conn.sendall((f"POST /api/v1/handshake HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
    time.sleep(0.3)
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.7)
    assert d.proc.poll() is None, "the daemon must wait for the in-flight request"
    blocker.execute("ROLLBACK")
    blocker.close()
    response = b""
    while chunk := conn.recv(65536):
        response += chunk
    conn.close()
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    assert b'"authorization"' in response
    assert d.proc.wait(15) == 0
    # The acknowledged grant is in the database after shutdown.
    con = sqlite3.connect(tmp_path / "state" / "lts-server.sqlite3")
    assert con.execute("SELECT COUNT(*) FROM seats WHERE client_uuid = 'dev-inflight'").fetchone()[0] == 1
    assert con.execute("SELECT COUNT(*) FROM events WHERE type = 'handshake' AND result = 0").fetchone()[0] == 1


def test_sighup_rescans_the_import_directory(tmp_path: Path, vendor: Vendor) -> None:
    d = start_daemon(write_config(tmp_path, vendor, log={"level": "info"}), tmp_path)
    token = asyncio.run(admin_login(d.url))
    try:
        assert get(f"{d.url}/api/v1/admin/imports", token)[1]["files"] == []
        (tmp_path / "import" / "new.lic").write_bytes(vendor.issue(license_spec("L9")))
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        files: list = []
        while time.monotonic() < deadline and not files:
            files = get(f"{d.url}/api/v1/admin/imports", token)[1]["files"]
            time.sleep(0.1)
        assert [(Path(f["path"]).name, f["state"]) for f in files] == [("new.lic", "imported")]
        assert '"event": "reload.done"' in d.log()
    finally:
        assert stop_daemon(d) == 0


def test_sighup_rereads_the_trusted_keys_from_the_config_and_retries_rejected_files(
        tmp_path: Path, vendor: Vendor) -> None:
    second = make_vendor(tmp_path / "second-vendor")
    (tmp_path / "import").mkdir(exist_ok=True)
    (tmp_path / "import" / "k2.lic").write_bytes(second.issue(license_spec("K2")))
    config = write_config(tmp_path, vendor)
    d = start_daemon(config, tmp_path)
    token = asyncio.run(admin_login(d.url))
    try:
        files = get(f"{d.url}/api/v1/admin/imports", token)[1]["files"]
        assert [(f["state"], f["reason"].split(":")[0]) for f in files] == [("rejected", "unknown-key")]
        assert get(f"{d.url}/api/v1/admin/status", token)[1]["importDirectory"]["rejected"] == 1
        write_config(tmp_path, vendor, vendor={"public_keys": [str(vendor.pub_path), str(second.pub_path)]})
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and files[0]["state"] == "rejected":
            time.sleep(0.1)
            files = get(f"{d.url}/api/v1/admin/imports", token)[1]["files"]
        assert files[0]["state"] == "imported" and files[0]["licenseId"] == "K2"
        assert get(f"{d.url}/api/v1/admin/status", token)[1]["importDirectory"]["rejected"] == 0
    finally:
        assert stop_daemon(d) == 0


@pytest.mark.sqlite_only  # the SQLite file, its lock or the key files in the state folder
def test_log_lines_are_json_and_carry_no_secrets(tmp_path: Path, vendor: Vendor) -> None:
    (tmp_path / "import" ).mkdir()
    (tmp_path / "import" / "a.lic").write_bytes(vendor.issue(license_spec("L1")))
    d = start_daemon(write_config(tmp_path, vendor, log={"level": "debug"}), tmp_path)
    stop_daemon(d)
    lines = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    assert any(line["event"] == "server.listening" for line in lines)
    text = d.log()
    key_pem = (tmp_path / "state" / "server-key.pem").read_text()
    secret = (tmp_path / "state" / "server-secret").read_bytes()
    assert key_pem.splitlines()[1] not in text
    assert secret.hex() not in text


@pytest.mark.sqlite_only  # the SQLite file, its lock or the key files in the state folder
def test_unusable_state_folder_is_a_clear_start_error(tmp_path: Path, vendor: Vendor) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = write_config(tmp_path, vendor, storage={"state_dir": str(blocker / "state")})
    d = start_daemon(cfg, tmp_path, wait=False)
    assert d.proc.wait(20) == 1
    assert "cannot start" in d.log()
    assert "Traceback" not in d.log()


# Under CI a missing systemd-analyze fails the test rather than skipping it.
@pytest.mark.skipif(shutil.which("systemd-analyze") is None and not UNDER_CI,
                    reason="systemd-analyze is not installed")
@pytest.mark.parametrize(("name", "verified_as"), [("lts-server.service", "lts-server.service"),
                                                    ("lts-server@.service", "lts-server@node1.service")])
def test_systemd_unit_verifies(tmp_path: Path, name: str, verified_as: str) -> None:
    unit = (ROOT / "systemd" / name).read_text()
    lts = shutil.which("lts-server") or str(Path(__import__("sys").executable).parent / "lts-server")
    (tmp_path / name).write_text(unit.replace("/opt/lts-server/bin/lts-server", lts))
    if verified_as != name:  # a template is verified through an instance of it
        (tmp_path / verified_as).symlink_to(tmp_path / name)
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / verified_as)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for setting in ("Type=notify", "WatchdogSec=", "DynamicUser=yes", "StateDirectory=lts-server",
                    "ConfigurationDirectory=lts-server", "ProtectSystem=strict", "NoNewPrivileges=yes",
                    "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure"):
        assert setting in unit


def test_state_folder_is_0700_and_database_files_0600_whatever_the_umask(tmp_path: Path, vendor: Vendor) -> None:
    cfg = write_config(tmp_path, vendor, storage={"state_dir": str(tmp_path / "deep" / "state")})
    old = os.umask(0o000)  # the most permissive umask: nothing may come out group- or world-readable
    try:
        d = start_daemon(cfg, tmp_path)
    finally:
        os.umask(old)
    try:
        assert get(f"{d.url}/readyz")[0] == 200
        state = tmp_path / "deep" / "state"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        files = sorted(p.name for p in state.iterdir())
        assert "lts-server.sqlite3" in files and "lts-server.sqlite3-wal" in files
        for name in files:
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    finally:
        assert stop_daemon(d) == 0


def _make_read_only(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o444)
        return
    # root writes through permission bits: mark the file immutable instead.
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        unavailable(f"cannot make {path} read-only as root (chattr: {done.stderr.strip()})")


def test_a_read_only_database_refuses_to_start_and_says_why(tmp_path: Path, vendor: Vendor) -> None:
    cfg = write_config(tmp_path, vendor)
    assert stop_daemon(start_daemon(cfg, tmp_path)) == 0
    db_path = tmp_path / "state" / "lts-server.sqlite3"
    _make_read_only(db_path)
    try:
        d = start_daemon(cfg, tmp_path, wait=False)
        assert d.proc.wait(20) == 1
        log = d.log()
        assert "cannot start" in log and "cannot be written" in log and "Traceback" not in log
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(db_path)], check=False)


def test_the_daemon_creates_its_import_folder(tmp_path: Path, vendor: Vendor) -> None:
    folder = tmp_path / "var" / "import"
    cfg = write_config(tmp_path, vendor, **{"import": {"directory": str(folder), "watch": True}})
    d = start_daemon(cfg, tmp_path)
    try:
        assert folder.is_dir()
        assert "import.scan_failed" not in d.log() and "import.folder_not_created" not in d.log()
    finally:
        assert stop_daemon(d) == 0


def test_check_config_warns_about_no_vendor_key_and_a_missing_import_folder(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, None, **{"import": {"directory": str(tmp_path / "nowhere" / "import")}})
    (tmp_path / "import").rmdir()
    proc = subprocess.run([sys.executable, "-m", "lts_server", "--config", str(cfg), "--check-config"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "ok (2 warnings)" in proc.stdout
    assert "vendor.public_keys" in proc.stderr and "every license file will be rejected" in proc.stderr
    assert "import.directory" in proc.stderr and "does not exist" in proc.stderr


def test_print_uuid_without_config_says_what_to_do(tmp_path: Path) -> None:
    if Path("/etc/lts-server/lts-server.toml").exists():
        unavailable("this machine has an installed /etc/lts-server/lts-server.toml")
    proc = subprocess.run([sys.executable, "-m", "lts_server", "--print-uuid"], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--config PATH" in proc.stderr and "config/demo.toml" in proc.stderr


@pytest.mark.parametrize("unit_name", ["lts-server.service", "lts-server@.service"])
def test_systemd_documentation_points_at_files_the_package_installs(unit_name: str) -> None:
    import tomllib

    unit = (ROOT / "systemd" / unit_name).read_text()
    docs = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("Documentation=")]
    installed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    files = [d.removeprefix("file:///opt/lts-server/") for d in docs if d.startswith("file:")]
    assert files and "placeholder" not in unit and "github.com/lts-server" not in unit
    for f in files:
        folder, name = f.rsplit("/", 1)
        sources = installed[folder]
        assert any(Path(src).name == name and (ROOT / src).is_file() for src in sources), f
