"""`ltsctl alerts ...` against a running daemon, with a real SMTP server receiving the mail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from aiosmtpd.controller import Controller

from tests.conftest import ADMIN_PASSWORD, Daemon, Vendor, free_port, item, license_spec, start_daemon, stop_daemon
from tests.conftest import write_config
from tests.test_alerts import Mailbox, text


def ctl(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CONFIG_HOME": str(d.folder / "xdg"), "LTS_ADMIN_PASSWORD": ADMIN_PASSWORD}
    return subprocess.run([sys.executable, "-m", "lts_server.cli.ctl", "--server", d.url, *args],
                          capture_output=True, text=True, timeout=60, env=env)


def ok(d: Daemon, *args: str) -> str:
    out = ctl(d, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_ltsctl_alerts_manages_recipients_conditions_and_sends_mail(tmp_path: Path, vendor: Vendor) -> None:
    box = Mailbox()
    smtp_port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / "a.lic").write_bytes(vendor.issue(license_spec("L1", items=[item("L1-1", quantity=5)])))
    # The SMTP host comes from the environment, as an operator would override it.
    config = write_config(tmp_path, vendor, alerts={"deliver_seconds": 0.2})
    d = start_daemon(config, tmp_path, env={"LTS_ALERTS__SMTP__HOST": "127.0.0.1",
                                            "LTS_ALERTS__SMTP__PORT": str(smtp_port),
                                            "LTS_ALERTS__SMTP__FROM": "lts@example.com"})
    try:
        ok(d, "login", "--setup")
        assert "not configured" not in ok(d, "alerts", "show")
        assert ok(d, "alerts", "recipients", "ops@example.com;lead@example.com").split() == [
            "ops@example.com", "lead@example.com"]
        bad = ctl(d, "alerts", "recipients", "not-an-address")
        assert bad.returncode == 1 and "'not-an-address' is not an e-mail address" in bad.stderr
        assert "failures   off" in ok(d, "alerts", "conditions", "--off", "failures")
        added = json.loads(ok(d, "--json", "alerts", "webhooks", "add", "http://127.0.0.1:9/hook"))
        assert "http://127.0.0.1:9/hook" in ok(d, "alerts", "webhooks", "list")
        assert "removed" in ok(d, "alerts", "webhooks", "remove", str(added["id"]))

        assert "queued for ops@example.com, lead@example.com" in ok(d, "alerts", "test")
        for n in range(4):
            body = json.dumps({"handshakeCode": "216998-L1", "clientUuid": f"d{n}", "product": "barcode-reader",
                               "deploymentType": "browser"}).encode()
            request = urllib.request.Request(f"{d.url}/api/v1/handshake", body,
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as resp:
                assert resp.status == 200
        assert ok(d, "alerts", "check").startswith("alert ")
        assert "seats" in ok(d, "alerts", "open")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(box.to("ops@example.com")) < 2:
            time.sleep(0.1)
        subjects = [m["Subject"] for m in box.to("ops@example.com")]
        assert subjects == ["[lts-server] test notification", "[lts-server] alert: seats L1-1 80%"]
        assert "4 of 5 seats in use" in text(box.to("ops@example.com")[1])
        history = ok(d, "alerts", "history")
        assert "ops@example.com=sent" in history and "lead@example.com=sent" in history
    finally:
        assert stop_daemon(d) == 0
        controller.stop()
