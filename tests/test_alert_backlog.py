"""The alert backlog (issue 22, item 3): a configuration change or `ltsctl alerts retry` tries the outbox now,
and alerts older than alerts.max_age go out as one summary per receiver."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from lts_server import config as config_mod
from lts_server.alerts import delivery_json
from lts_server.core.times import parse_iso
from lts_server.server import Server
from tests.conftest import ADMIN_PASSWORD, Clock, Vendor, admin_login, wait_for, write_config
from tests.test_alerts import Mailbox, mailbox, text  # noqa: F401 - mailbox is a fixture


async def _backlog(tmp_path: Path, vendor: Vendor, clock: Clock, files: int) -> tuple[Server, aiohttp.ClientSession]:
    """A server without SMTP whose outbox holds one alert per rejected file, each tried and failed."""
    server = Server(config_mod.load(write_config(tmp_path, vendor), environ={}), clock=clock)
    await server.start()
    session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {await admin_login(server.urls[0])}"})
    async with session.put(server.urls[0] + "/api/v1/admin/alerts/recipients",
                           json={"recipients": "ops@example.com"}) as resp:
        assert resp.status == 200
    for n in range(files):
        (tmp_path / "import" / f"bad-{n}.lic").write_bytes(b"not a license")
        await server.services.importer.scan("test")
        await server.services.alerts.check()  # (the import asked for one too: whichever runs first raises it)
        clock.advance(minutes=1)
    assert len(await server.services.store.alert_history()) == files
    return server, session


async def _deliveries(server: Server) -> list[dict]:
    """The deliveries as the history (API, portal) shows them (read directly: the test's clock outran the token)."""
    return [delivery_json(d) for a in await server.services.store.alert_history() for d in a.deliveries]


async def test_smtp_configured_and_sighup_deliver_the_backlog_now_as_one_summary(
        tmp_path: Path, vendor: Vendor, mailbox: tuple[Mailbox, int]) -> None:
    box, smtp_port = mailbox
    clock = Clock()
    server, session = await _backlog(tmp_path, vendor, clock, files=3)
    url = server.urls[0]
    try:
        clock.advance(hours=25)  # the alerts are now older than max_age (24 h)
        for _ in range(6):  # tried and failed (no SMTP): each failure doubles the wait
            clock.now = max(clock.now, parse_iso((await _deliveries(server))[-1]["nextTryAt"]))
            await server.services.alerts.deliver_due()
        pending = await _deliveries(server)
        assert [d["state"] for d in pending] == ["pending"] * 3
        assert all("no SMTP server" in d["lastError"] for d in pending)
        # The oldest waits for its next try (the others wait behind it, in order).
        assert parse_iso(pending[-1]["nextTryAt"]) > clock.now + timedelta(seconds=30)
        # The admin configures SMTP and reloads: the outbox is tried now, not after the backoff.
        config = tmp_path / "config.toml"
        config.write_text(config.read_text() + f'[alerts.smtp]\nhost = "127.0.0.1"\nport = {smtp_port}\n')
        await server.reload()
        await wait_for(lambda: box.messages, timeout=15)
        await asyncio.sleep(0.5)
        assert len(box.messages) == 1  # one summary, not one mail per alert
        mail = box.messages[0][1]
        assert "3 alerts held back" in mail["Subject"]
        body = text(mail)
        assert all(f"bad-{n}.lic" in body for n in range(3))
        assert [d["state"] for d in await _deliveries(server)] == ["sent"] * 3
    finally:
        await session.close()
        await server.stop()


async def test_ltsctl_alerts_retry_tries_the_outbox_now(tmp_path: Path, vendor: Vendor,
                                                        mailbox: tuple[Mailbox, int]) -> None:
    box, smtp_port = mailbox
    clock = Clock()
    server, session = await _backlog(tmp_path, vendor, clock, files=2)
    url = server.urls[0]
    try:
        await server.services.alerts.deliver_due()  # fails: no SMTP yet
        for _ in range(5):
            clock.advance(seconds=400)
            await server.services.alerts.deliver_due()
        # SMTP set up in the running config (as a reload would), but the deliveries wait behind their backoff.
        server.services.alerts.config.smtp.host = "127.0.0.1"
        server.services.alerts.config.smtp.port = smtp_port
        await server.services.alerts.deliver_due()
        assert box.messages == []
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "LTS_ADMIN_PASSWORD": ADMIN_PASSWORD}

        def ctl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "lts_server.cli.ctl", "--server", url, *args],
                                  capture_output=True, text=True, env=env, timeout=60)

        assert (await asyncio.to_thread(ctl, "login")).returncode == 0
        out = await asyncio.to_thread(ctl, "alerts", "retry")
        assert out.returncode == 0 and "2 pending" in out.stdout, out.stderr
        await wait_for(lambda: len(box.messages) == 2, timeout=15)
        # Younger than max_age: one mail per alert, oldest first.
        subjects = [m["Subject"] for _, m in box.messages]
        assert all("held back" not in s for s in subjects)
        assert "bad-0.lic" in text(box.messages[0][1]) and "bad-1.lic" in text(box.messages[1][1])
    finally:
        await session.close()
        await server.stop()


def test_max_age_takes_a_duration(tmp_path: Path, vendor: Vendor) -> None:
    assert config_mod.duration_seconds(config_mod.load(write_config(tmp_path, vendor), environ={}).alerts.max_age) \
        == timedelta(hours=24).total_seconds()
    for value, seconds in (("90m", 5400), ("2d", 172800), ("3600s", 3600), (6, 21600)):
        cfg = config_mod.load(write_config(tmp_path, vendor, alerts={"max_age": value}), environ={})
        assert config_mod.duration_seconds(cfg.alerts.max_age) == seconds
    with pytest.raises(config_mod.ConfigError, match="alerts.max_age"):
        config_mod.load(write_config(tmp_path, vendor, alerts={"max_age": "soon"}), environ={})
