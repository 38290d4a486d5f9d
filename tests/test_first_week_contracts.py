"""Messages and small contracts an operator met in the first week (issue 22, items 11-16)."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import Running, Vendor, item, license_spec, write_config

pytestmark = pytest.mark.sqlite_only


# -- 11: no message says None; each says what to do next -------------------------------------

async def _post(running: Running, path: str, body: object) -> tuple[int, dict]:
    async with running.session.post(running.url + path, json=body) as resp:
        return resp.status, await resp.json()


async def test_error_messages_name_no_none_and_say_what_to_do(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[item("L1-1")])))
    await _post(running, "/api/v1/admin/handshake-codes", {
        "organizationId": "216998", "custom": "web", "items": ["L1-1"], "domains": ["*.example.com"]})
    await _post(running, "/api/v1/admin/handshake-codes", {
        "organizationId": "216998", "custom": "app", "items": ["L1-1"], "appIds": ["com.example.app"]})
    refusals = [
        {"handshakeCode": "216998-web"},  # no domain at all
        {"handshakeCode": "216998-app", "deploymentType": "mobile"},  # no app id
        {"handshakeCode": "216998-nope"},
        {"organizationId": "999999"},
        {},
    ]
    messages = []
    for body in refusals:
        status, answer = await running.handshake(**body)
        assert status in (400, 403, 404), answer
        messages.append(answer["error"]["message"])
    assert "a request without domain" in messages[0]
    assert "a request without appId" in messages[1]
    for body in ({"organizationId": "216998"}, {"organizationId": "216998", "custom": "x" * 80},
                 {"organizationId": "216998", "custom": "ok", "items": ["no-such-item"]}):
        status, answer = await _post(running, "/api/v1/admin/handshake-codes", body)
        assert status == 400, answer
        messages.append(answer["error"]["message"])
    for path in ("/api/v1/admin/handshake-codes/216998-nope", "/api/v1/admin/licenses/nope"):
        async with running.session.get(running.url + path) as resp:
            assert resp.status == 404
            messages.append((await resp.json())["error"]["message"])
    async with running.session.delete(running.url + "/api/v1/admin/items/L1-1/devices/nobody") as resp:
        assert resp.status == 404
        messages.append((await resp.json())["error"]["message"])
    for message in messages:
        assert "None" not in message, message
    # Each refusal says what to do next: a field to send or a command to run.
    hints = ("send ", "`ltsctl", "check ", "give ", "add ", "remove ")
    for message in messages:
        assert any(h in message for h in hints), message
    assert "custom: required" in messages[5]


# -- 12: a custom part that repeats the organization prefix ------------------------------------

async def test_custom_part_holding_the_organization_prefix_is_refused(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", org="777001", items=[item("L1-1")])))
    status, answer = await _post(running, "/api/v1/admin/handshake-codes",
                                 {"organizationId": "777001", "custom": "777001-foo", "items": ["L1-1"]})
    assert status == 400, answer
    assert answer["error"]["field"] == "custom"
    assert "777001-777001-foo" in answer["error"]["message"] and "'foo'" in answer["error"]["message"]
    assert "777001-777001-foo" not in running.ledger.codes
    # The same on rename.
    status, _ = await _post(running, "/api/v1/admin/handshake-codes",
                            {"organizationId": "777001", "custom": "foo", "items": ["L1-1"]})
    assert status == 201
    async with running.session.patch(running.url + "/api/v1/admin/handshake-codes/777001-foo",
                                     json={"custom": "777001-bar"}) as resp:
        assert resp.status == 400
        assert "777001-777001-bar" in (await resp.json())["error"]["message"]


# -- 13: two Content-Type headers ----------------------------------------------------------------

async def _raw(running: Running, request: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = running.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize("path", ["/api/v1/handshake", "/api/v1/admin/handshake-codes", "/api/v1/usage"])
async def test_two_content_type_headers_get_the_json_error_format(running: Running, path: str) -> None:
    body = b'{"handshakeCode": "216998-x", "clientUuid": "d", "product": "p", "deploymentType": "browser"}'
    status, headers, answer = await _raw(running, (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    import json

    error = json.loads(answer)["error"]
    assert error["code"] == 400 and "Content-Type" in error["message"]


# -- 14: ltsctl setup asks twice on a terminal --------------------------------------------------

def _ctl_on_a_terminal(url: str, home: Path, answers: list[str], *args: str) -> tuple[int, str]:
    """Run ltsctl with a pseudo-terminal as its controlling terminal, typing `answers` at its prompts."""
    master, slave = pty.openpty()
    # A new session takes the terminal as its controlling one (getpass reads /dev/tty); no preexec_fn,
    # which is not safe to fork with from a process that runs threads.
    take_terminal = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                     "os.execv(sys.executable, [sys.executable, '-m', 'lts_server.cli.ctl', *sys.argv[1:]])")
    env = {k: v for k, v in os.environ.items() if k != "LTS_ADMIN_PASSWORD"}
    proc = subprocess.Popen([sys.executable, "-c", take_terminal, "--server", url, *args],
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            env={**env, "XDG_CONFIG_HOME": str(home)})
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + 30
    pending = list(answers)
    while True:
        assert time.monotonic() < deadline, screen
        if not select.select([master], [], [], 0.5)[0]:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        screen += chunk
        if pending and screen.endswith(b": "):  # a prompt waits (the echoed newline of an answer does not)
            os.write(master, pending.pop(0).encode() + b"\n")
    os.close(master)
    return proc.wait(30), screen.decode(errors="replace")


async def test_ltsctl_setup_asks_twice_and_refuses_a_mismatch(tmp_path: Path, vendor: Vendor) -> None:
    from lts_server import config as config_mod
    from lts_server.server import Server

    server = Server(config_mod.load(write_config(tmp_path, vendor), environ={}))
    await server.start()
    try:
        url = server.urls[0]
        code, screen = await asyncio.to_thread(_ctl_on_a_terminal, url, tmp_path / "xdg",
                                               ["first long password", "another long password"], "setup")
        assert code == 2, screen
        assert "again" in screen and "differ" in screen
        assert await server.services.store.admin_password_hash() is None  # nothing was set
        code, screen = await asyncio.to_thread(_ctl_on_a_terminal, url, tmp_path / "xdg",
                                               ["a long good password", "a long good password"], "setup")
        assert code == 0, screen
        assert "logged in" in screen
        assert await server.services.store.admin_password_hash() is not None
    finally:
        await server.stop()


# -- 15: a handshake naming only the organization -----------------------------------------------

async def test_organization_only_handshake_uses_every_default_code_oldest_first(running: Running) -> None:
    await running.drop("old.lic", running.vendor.issue(license_spec("OLD", items=[item("old-1", quantity=1)])))
    running.clock.advance(seconds=5)
    await running.drop("new.lic", running.vendor.issue(license_spec("NEW", items=[item("new-1", quantity=2)])))
    granted = []
    for n in range(3):
        status, answer = await running.handshake(organizationId="216998", clientUuid=f"d{n}")
        assert status == 200, answer
        granted.append((answer["authorization"]["handshakeCode"], answer["authorization"]["itemId"]))
    # Oldest license first; then the next default code, not a refusal.
    assert granted == [("216998-OLD", "old-1"), ("216998-NEW", "new-1"), ("216998-NEW", "new-1")]
    status, answer = await running.handshake(organizationId="216998", clientUuid="d9")
    assert status == 403 and answer["error"]["code"] == 120
    # A device seated through the second code keeps its seat there.
    status, answer = await running.handshake(organizationId="216998", clientUuid="d1")
    assert status == 200 and answer["authorization"]["itemId"] == "new-1"
    assert running.ledger.status("new-1").seats_used == 2


# -- 16: lts-license help shows examples; init writes a commented template ----------------------

def _license(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lts_server.cli.vendor", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def test_lts_license_help_has_examples_and_init_writes_a_template(tmp_path: Path) -> None:
    top = _license("--help", cwd=tmp_path)
    assert top.returncode == 0 and "example:" in top.stdout and "lts-license issue" in top.stdout
    for command in ("init", "keygen", "issue", "verify", "show"):
        out = _license(command, "--help", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "example:" in out.stdout and f"lts-license {command}" in out.stdout, out.stdout
    assert _license("init", "spec.toml", "--license-id", "100028117", "--organization-id", "216998",
                    cwd=tmp_path).returncode == 0
    text = (tmp_path / "spec.toml").read_text()
    assert sum(1 for line in text.splitlines() if line.startswith("#")) >= 10  # commented
    spec = tomllib.loads(text)
    assert spec["license_id"] == "100028117" and spec["organization_id"] == "216998"
    assert _license("init", "spec.toml", cwd=tmp_path).returncode == 2  # never overwrites without --force
    # The template issues as it is, and with its commented per-domain item switched on.
    assert _license("keygen", "--out", "v", cwd=tmp_path).returncode == 0
    issued = _license("issue", "spec.toml", "--key", "v/vendor.key", "--out", "a.lic", cwd=tmp_path)
    assert issued.returncode == 0, issued.stderr
    lines = text.splitlines()
    start = lines.index("# [[items]]")
    lines[start:] = [line.removeprefix("# ") for line in lines[start:]]
    (tmp_path / "two.toml").write_text("\n".join(lines) + "\n")
    issued = _license("issue", "two.toml", "--key", "v/vendor.key", "--out", "b.lic", cwd=tmp_path)
    assert issued.returncode == 0 and "2 item(s)" in issued.stdout, issued.stderr
    verified = _license("verify", "b.lic", "--public-key", "v/vendor.pub", cwd=tmp_path)
    assert verified.returncode == 0 and verified.stdout.startswith("VALID")
    # Its commented borrowing and version lines, switched on, are keys the tool takes.
    lines = [line.removeprefix("# ") if line.startswith(("# borrow_max_days", "# versions")) else line
             for line in text.splitlines()]
    (tmp_path / "three.toml").write_text("\n".join(lines) + "\n")
    issued = _license("issue", "three.toml", "--key", "v/vendor.key", "--out", "c.lic", cwd=tmp_path)
    assert issued.returncode == 0, issued.stderr
    shown = _license("show", "c.lic", "--public-key", "v/vendor.pub", cwd=tmp_path)
    assert shown.returncode == 0 and "borrow up to 14 days, versions >=3.0,<5" in shown.stdout, shown.stdout

