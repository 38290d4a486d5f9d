"""Usage alerts end to end: a real SMTP server (aiosmtpd) and a real HTTP receiver on real sockets.

Seats and units are driven to each level through handshakes and usage
reports; the tests read the exact messages that arrive, check the webhook
signatures, take the receiver down and bring it back, and restart the server.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller

from lts_server import config as config_mod
from lts_server.core.times import iso, slice_start
from lts_server.server import Server
from tests.conftest import Clock, Running, Vendor, admin_login, free_port, item, license_spec, wait_for, write_config

SECRET = "webhook-secret-0123456789abcdef"
PORTAL = "https://lts.example.com/dls"


class Mailbox:
    """An aiosmtpd handler that keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        self.messages.append((list(envelope.rcpt_tos), msg))
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for rcpt, m in self.messages if address in rcpt]


@dataclass
class Receiver:
    """An HTTP receiver on a fixed port that can go down (port closed) and come back."""

    port: int
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def up(self) -> None:
        async def hook(request: web.Request) -> web.Response:
            self.posts.append((dict(request.headers), await request.read()))
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def down(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.posts]


@dataclass
class Alerting:
    running: Running
    mailbox: Mailbox
    receiver: Receiver
    config_path: Path

    @property
    def server(self) -> Server:
        return self.running.server

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.running.session.request(method, self.running.url + path, json=body) as resp:
            return resp.status, await resp.json()

    async def check(self) -> dict[str, Any]:
        status, body = await self.api("POST", "/api/v1/admin/alerts/check")
        assert status == 200, body
        return body

    async def devices(self, first: int, last: int, code: str = "216998-L1") -> None:
        for n in range(first, last + 1):
            status, body = await self.running.handshake(handshakeCode=code, clientUuid=f"dev-{n}")
            assert status == 200, body


@pytest.fixture
async def mailbox() -> AsyncIterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(free_port())
    await r.up()
    yield r
    await r.down()


def alert_config(folder: Path, vendor: Vendor, smtp_port: int) -> Path:
    return write_config(folder, vendor, alerts={"portal_url": PORTAL, "failure_min_requests": 20},
                        **{"alerts.smtp": {"host": "127.0.0.1", "port": smtp_port, "from": "lts@example.com"}})


async def start(folder: Path, vendor: Vendor, config_path: Path, clock: Clock) -> tuple[Server, str, str]:
    server = Server(config_mod.load(config_path, environ={}), clock=clock)
    await server.start()
    return server, server.urls[0], await admin_login(server.urls[0])


@pytest.fixture
async def alerting(tmp_path: Path, vendor: Vendor, mailbox: tuple[Mailbox, int],
                   receiver: Receiver) -> AsyncIterator[Alerting]:
    box, smtp_port = mailbox
    (tmp_path / "import").mkdir(parents=True, exist_ok=True)
    (tmp_path / "import" / "l1.lic").write_bytes(vendor.issue(license_spec("L1", items=[
        item("L1-1", quantity=10),
        item("L1-S", license_type="per-scan", quantity=1000, product="scanner"),
    ])))
    config_path = alert_config(tmp_path, vendor, smtp_port)
    clock = Clock()
    server, url, token = await start(tmp_path, vendor, config_path, clock)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        running = Running(server, url, tmp_path, vendor, session, clock)
        a = Alerting(running, box, receiver, config_path)
        assert (await a.api("PUT", "/api/v1/admin/alerts/recipients",
                            {"recipients": "ops@example.com; lead@example.com"}))[0] == 200
        status, hook = await a.api("POST", "/api/v1/admin/alerts/webhooks", {"url": receiver.url, "secret": SECRET})
        assert status == 201 and hook["secret"] == SECRET
        await a.check()  # the start-up state: nothing is met yet
        yield a
    await running.server.stop()


def text(mail: EmailMessage) -> str:
    """The body as sent, with SMTP's CRLF line ends read back as newlines."""
    return mail.get_content().replace("\r\n", "\n")


def signed(headers: dict[str, str], body: bytes) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers.get("X-LTS-Signature", ""), expected)


async def test_seats_crossing_80_percent_mail_every_recipient_and_post_a_signed_webhook(alerting: Alerting) -> None:
    await alerting.devices(1, 8)
    result = await alerting.check()
    assert result["new"] == ["seats:L1-1"]
    await wait_for(lambda: len(alerting.mailbox.messages) == 2 and len(alerting.receiver.posts) == 1)
    [mail] = alerting.mailbox.to("ops@example.com")
    assert alerting.mailbox.to("lead@example.com")[0]["Message-ID"] == mail["Message-ID"]
    assert mail["Subject"] == "[lts-server] alert: seats L1-1 80%"
    assert mail["From"] == "lts@example.com" and mail["To"] == "ops@example.com"
    uuid = alerting.server.services.identity.server_uuid
    when = iso(alerting.running.clock())
    assert text(mail) == (
        f"lts-server {uuid} found 1 new alert condition at {when}:\n\n"
        "- Item L1-1 (barcode-reader, per-device) has 8 of 10 seats in use (limit with grace 11): "
        "80% of its 10 seats.\n"
        f"  {PORTAL}/portal/stats/item/L1-1\n\n"
        f"Alert {result['alertId']}. Recipients, webhooks and conditions: {PORTAL}/portal/alerts\n")
    headers, body = alerting.receiver.posts[0]
    assert signed(headers, body)
    assert headers["X-LTS-Alert-Id"] == str(result["alertId"])
    payload = json.loads(body)
    assert payload["type"] == "alert" and payload["serverUuid"] == uuid
    assert payload["conditions"] == [{
        "key": "seats:L1-1", "kind": "seats", "subject": "L1-1", "level": 80, "label": "80%",
        "message": "Item L1-1 (barcode-reader, per-device) has 8 of 10 seats in use (limit with grace 11): "
                   "80% of its 10 seats.",
        "link": f"{PORTAL}/portal/stats/item/L1-1"}]


async def test_each_seat_level_alerts_once_and_110_percent_says_new_devices_are_refused(alerting: Alerting) -> None:
    subjects = []
    for last, label in ((6, "60%"), (8, "80%"), (10, "100%"), (11, "110%")):
        await alerting.devices(last - 1 if last > 6 else 1, last)
        await alerting.check()
        assert (await alerting.check())["new"] == []  # once per level
        subjects.append(f"[lts-server] alert: seats L1-1 {label}")
    await wait_for(lambda: len(alerting.mailbox.to("ops@example.com")) == 4 and len(alerting.receiver.posts) == 4)
    assert [m["Subject"] for m in alerting.mailbox.to("ops@example.com")] == subjects
    assert text(alerting.mailbox.to("ops@example.com")[-1]).count("new devices are refused") == 1
    assert [p["conditions"][0]["level"] for p in alerting.receiver.bodies()] == [60, 80, 100, 110]
    status, refused = await alerting.running.handshake(handshakeCode="216998-L1", clientUuid="dev-12")
    assert status == 403 and refused["error"]["code"] == 120


async def test_a_usage_report_that_crosses_a_unit_level_alerts_at_once(alerting: Alerting) -> None:
    running = alerting.running
    assert (await running.handshake(handshakeCode="216998-L1", clientUuid="scanner-1", product="scanner"))[0] == 200
    slot = iso(slice_start(running.clock()))
    status, _ = await running.report({
        "reportId": "r-1", "clientUuid": "scanner-1", "handshakeCode": "216998-L1",
        "records": [{"slot": slot, "product": "scanner", "operation": "scan", "count": 850}]})
    assert status == 200
    # No explicit check: the report itself asks for one.
    await wait_for(lambda: len(alerting.mailbox.to("ops@example.com")) == 1)
    mail = alerting.mailbox.to("ops@example.com")[0]
    assert mail["Subject"] == "[lts-server] alert: units L1-S 80%"
    assert "has used 850 of 1,000 units (limit with grace 1,050): 80% of its quota." in text(mail)


async def test_failed_authorizations_alert_per_code_once_enough_requests_were_seen(alerting: Alerting) -> None:
    running = alerting.running
    for n in range(16):
        await running.handshake(handshakeCode="216998-L1", clientUuid=f"ok-{n % 4}")
    for n in range(3):
        await running.handshake(handshakeCode="216998-L1", clientUuid=f"bad-{n}", product="nope")
    await alerting.server.roll_up()
    assert (await alerting.check())["new"] == []  # 19 requests: below the minimum of 20
    await running.handshake(handshakeCode="216998-L1", clientUuid="bad-4", product="nope")
    await alerting.server.roll_up()
    assert (await alerting.check())["new"] == ["failures:216998-L1"]
    await wait_for(lambda: alerting.mailbox.to("ops@example.com"))
    body = text(alerting.mailbox.to("ops@example.com")[0])
    assert "- Handshake code 216998-L1: 4 of 20 authorizations failed in the last 60 minutes (20%)." in body
    assert f"{PORTAL}/portal/stats/code/216998-L1" in body


async def test_a_rejected_license_file_alerts_at_once(alerting: Alerting) -> None:
    await alerting.running.drop("broken.lic", b"not a license file")
    await wait_for(lambda: alerting.mailbox.to("ops@example.com"))
    mail = alerting.mailbox.to("ops@example.com")[0]
    assert mail["Subject"].startswith("[lts-server] alert: import ")
    assert "broken.lic was rejected: " in text(mail)


async def test_one_notification_holds_every_condition_met_at_once(alerting: Alerting) -> None:
    await alerting.devices(1, 10)
    alerting.running.clock.advance(days=365 - 6)  # L1-1 and L1-S now expire within 7 days
    # (the admin token has expired by then: ask the alerter itself)
    result = await alerting.server.services.alerts.check()
    assert [c.key for c in result.new] == ["seats:L1-1", "expiry:L1-1", "expiry:L1-S"]
    await wait_for(lambda: len(alerting.receiver.posts) == 1 and len(alerting.mailbox.messages) == 2)
    mail = alerting.mailbox.to("ops@example.com")[0]
    assert mail["Subject"] == ("[lts-server] 3 new alerts: seats L1-1 100%, expiry L1-1 expires within 7 days, "
                               "expiry L1-S expires within 7 days")
    assert len(alerting.receiver.bodies()[0]["conditions"]) == 3


async def test_a_receiver_down_for_an_hour_gets_everything_afterwards_in_order(alerting: Alerting) -> None:
    await alerting.receiver.down()
    await alerting.devices(1, 6)
    first = (await alerting.check())["alertId"]
    await alerting.devices(7, 8)
    second = (await alerting.check())["alertId"]
    await wait_for(lambda: len(alerting.mailbox.to("ops@example.com")) == 2)  # e-mail is not held up
    status, history = await alerting.api("GET", "/api/v1/admin/alerts/history")
    hooks = [d for a in history["alerts"] for d in a["deliveries"] if d["channel"] == "webhook"]
    assert {d["state"] for d in hooks} == {"pending"}
    assert any(d["lastError"] and alerting.receiver.url in d["lastError"] for d in hooks)
    for _ in range(12):  # an hour of retries, five minutes apart
        alerting.running.clock.advance(minutes=5)
        await alerting.server.services.alerts.deliver_due()
    assert alerting.receiver.posts == []
    await alerting.receiver.up()
    # The older delivery waits for its retry, and the newer one waits behind it: order is kept.
    await alerting.server.services.alerts.deliver_due()
    assert alerting.receiver.posts == []
    alerting.running.clock.advance(minutes=10)
    await alerting.server.services.alerts.deliver_due()
    assert [b["alertId"] for b in alerting.receiver.bodies()] == [first, second]
    assert all(signed(h, b) for h, b in alerting.receiver.posts)
    status, history = await alerting.api("GET", "/api/v1/admin/alerts/history")
    assert {d["state"] for a in history["alerts"] for d in a["deliveries"]} == {"sent"}
    alerting.running.clock.advance(hours=1)
    await alerting.server.services.alerts.deliver_due()
    assert len(alerting.receiver.posts) == 2


async def test_pending_deliveries_survive_a_restart_and_nothing_is_sent_twice(alerting: Alerting) -> None:
    running = alerting.running
    await alerting.devices(1, 6)
    await alerting.check()
    await wait_for(lambda: len(alerting.receiver.posts) == 1 and len(alerting.mailbox.messages) == 2)
    await alerting.receiver.down()
    await alerting.devices(7, 8)
    await alerting.check()  # the 80% webhook delivery now waits in the outbox
    await wait_for(lambda: len(alerting.mailbox.messages) == 4)
    await running.server.stop()

    await alerting.receiver.up()
    running.clock.advance(minutes=1)
    server, url, token = await start(running.folder, running.vendor, alerting.config_path, running.clock)
    try:
        await server.services.alerts.deliver_due()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
            async with s.post(url + "/api/v1/admin/alerts/check") as resp:
                assert (await resp.json())["new"] == []  # the levels notified survive a restart
        await server.services.alerts.deliver_due()
        await asyncio.sleep(0.2)
        assert [p["conditions"][0]["level"] for p in alerting.receiver.bodies()] == [60, 80]
        assert len(alerting.mailbox.messages) == 4
    finally:
        await server.stop()
        running.server = server  # the fixture stops this one again: harmless


async def test_a_level_that_cleared_alerts_again(alerting: Alerting) -> None:
    await alerting.devices(1, 8)
    await alerting.check()
    alerting.running.clock.advance(minutes=2)  # a level notified within the last minute does not fall yet
    for n in (7, 8):
        async with alerting.running.session.delete(
                f"{alerting.running.url}/api/v1/admin/items/L1-1/devices/dev-{n}") as resp:
            assert resp.status == 200
    assert (await alerting.check())["new"] == []  # 60%: lower, not new
    await alerting.devices(7, 8)
    assert (await alerting.check())["new"] == ["seats:L1-1"]
    await wait_for(lambda: len(alerting.mailbox.to("ops@example.com")) == 2)
    assert [m["Subject"][-3:] for m in alerting.mailbox.to("ops@example.com")] == ["80%", "80%"]


async def test_switched_off_conditions_do_not_alert(alerting: Alerting) -> None:
    status, body = await alerting.api("PUT", "/api/v1/admin/alerts/conditions", {"seats": False})
    assert status == 200 and body["conditions"]["seats"] is False and body["conditions"]["units"] is True
    await alerting.devices(1, 9)
    assert (await alerting.check())["new"] == []
    status, body = await alerting.api("PUT", "/api/v1/admin/alerts/conditions", {"bogus": True})
    assert status == 400 and "bogus" in body["error"]["message"]


async def test_send_a_test_notification_to_every_channel(alerting: Alerting) -> None:
    status, body = await alerting.api("POST", "/api/v1/admin/alerts/test")
    assert status == 202
    assert sorted(d["target"] for d in body["deliveries"]) == [alerting.receiver.url, "lead@example.com",
                                                               "ops@example.com"]
    await wait_for(lambda: len(alerting.mailbox.messages) == 2 and len(alerting.receiver.posts) == 1)
    mail = alerting.mailbox.to("lead@example.com")[0]
    assert mail["Subject"] == "[lts-server] test notification"
    assert "alerts reach this receiver" in text(mail)
    headers, raw = alerting.receiver.posts[0]
    assert signed(headers, raw) and json.loads(raw)["type"] == "test"
    status, history = await alerting.api("GET", "/api/v1/admin/alerts/history")
    assert history["alerts"][0]["type"] == "test"
    await wait_for(lambda: all(d["state"] == "sent" for d in history["alerts"][0]["deliveries"]))


async def test_open_alerts_list_what_is_met_with_links(alerting: Alerting) -> None:
    await alerting.devices(1, 6)
    await alerting.check()
    status, body = await alerting.api("GET", "/api/v1/admin/alerts/open")
    assert status == 200
    assert [(a["key"], a["label"], a["link"]) for a in body["alerts"]] == [
        ("seats:L1-1", "60%", "/portal/stats/item/L1-1")]


async def test_recipients_and_webhooks_are_validated(alerting: Alerting) -> None:
    status, body = await alerting.api("PUT", "/api/v1/admin/alerts/recipients", {"recipients": "ops@example.com, x"})
    assert status == 400 and "separate addresses with semicolons" in body["error"]["message"]
    status, body = await alerting.api("POST", "/api/v1/admin/alerts/webhooks", {"url": "ftp://x"})
    assert status == 400 and body["error"]["field"] == "url"
    status, made = await alerting.api("POST", "/api/v1/admin/alerts/webhooks", {"url": "http://127.0.0.1:9/x"})
    assert status == 201 and len(made["secret"]) >= 32
    status, listed = await alerting.api("GET", "/api/v1/admin/alerts/webhooks")
    assert all("secret" not in h for h in listed["webhooks"]) and len(listed["webhooks"]) == 2
    assert (await alerting.api("DELETE", f"/api/v1/admin/alerts/webhooks/{made['id']}"))[0] == 200
    assert (await alerting.api("DELETE", f"/api/v1/admin/alerts/webhooks/{made['id']}"))[0] == 404
    # Ids the database's INTEGER cannot hold, and a digit that is not 0-9, name no webhook.
    for other in (str(2**31), "9" * 30, "%C2%B2"):
        status, body = await alerting.api("DELETE", f"/api/v1/admin/alerts/webhooks/{other}")
        assert status == 404 and "no such webhook" in body["error"]["message"], body


async def test_periodic_checks_run_without_being_asked(tmp_path: Path, vendor: Vendor,
                                                       mailbox: tuple[Mailbox, int]) -> None:
    box, port = mailbox
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / "l1.lic").write_bytes(vendor.issue(license_spec("L1", items=[
        item("L1-1", expires_at=item("x")["starts_at"] + timedelta(days=20))])))
    path = write_config(tmp_path, vendor, alerts={"check_seconds": 0.2, "deliver_seconds": 0.1},
                        **{"alerts.smtp": {"host": "127.0.0.1", "port": port}})
    server = Server(config_mod.load(path, environ={}))
    await server.start()
    try:
        await server.services.store.set_alert_recipients("ops@example.com")
        await wait_for(lambda: box.to("ops@example.com"))
        assert box.to("ops@example.com")[0]["Subject"] == "[lts-server] alert: expiry L1-1 expires within 30 days"
    finally:
        await server.stop()


async def test_overuse_mirrored_by_the_roll_up_asks_for_a_check_at_once(alerting: Alerting) -> None:
    running = alerting.running
    await running.drop("c.lic", running.vendor.issue(license_spec("C", items=[
        item("C-1", license_type="per-concurrent-instance", quantity=1)])))
    await alerting.check()
    # What the roll-up job does when instance-slices beyond the quantity were counted (1,000 is the allowance).
    await running.ledger.mirror_overuse({"C-1": 650})
    alerting.server.services.alerts.after_usage(["C-1"])
    await wait_for(lambda: alerting.mailbox.to("ops@example.com"))
    mail = alerting.mailbox.to("ops@example.com")[0]
    assert mail["Subject"] == "[lts-server] alert: overuse C-1 60%"
    assert "has used 650 of its overuse allowance of 1,000 slices (60%)." in text(mail)


async def test_smtp_login_uses_the_password_file_and_a_wrong_one_is_retried(tmp_path: Path, vendor: Vendor) -> None:
    from aiosmtpd.smtp import AuthResult, LoginPassword

    box = Mailbox()
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password))
        ok = data.password == b"smtp-pass-1"
        return AuthResult(success=ok, handled=ok)  # not handled: the server answers 535 itself

    port = free_port()
    # A test server without TLS may offer AUTH only when told so (a real one would require TLS first).
    controller = Controller(box, hostname="127.0.0.1", port=port, authenticator=authenticator,
                            auth_require_tls=False, auth_required=True)
    controller.start()
    password = tmp_path / "smtp-password"
    password.write_text("wrong-pass\n")
    (tmp_path / "import").mkdir()
    path = write_config(tmp_path, vendor, **{"alerts.smtp": {"host": "127.0.0.1", "port": port, "username": "lts",
                                                              "password_file": str(password),
                                                              "timeout_seconds": 5}})
    clock = Clock()
    server = Server(config_mod.load(path, environ={}), clock=clock)
    await server.start()
    try:
        await server.services.store.set_alert_recipients("ops@example.com")
        await server.services.alerts.send_test()
        await server.services.alerts.deliver_due()
        [alert] = await server.services.store.alert_history(1)
        assert alert.deliveries[0].state == "pending" and "SMTPAuthenticationError" in alert.deliveries[0].last_error
        password.write_text("smtp-pass-1\n")  # fixed: read again at the next try
        clock.advance(minutes=1)
        await server.services.alerts.deliver_due()
        # (smtplib tries each mechanism the server offers before it gives up)
        assert set(logins[:-1]) == {(b"lts", b"wrong-pass")} and logins[-1] == (b"lts", b"smtp-pass-1")
        assert [m["Subject"] for m in box.to("ops@example.com")] == ["[lts-server] test notification"]
    finally:
        await server.stop()
        controller.stop()


def _tls_files(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key."""
    import ipaddress
    from datetime import UTC, datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test SMTP")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "smtp.crt", folder / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_mail_goes_over_starttls_or_tls_checked_against_the_configured_ca(tmp_path: Path, vendor: Vendor,
                                                                                  mode: str) -> None:
    import ssl

    cert, key = _tls_files(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    box = Mailbox()
    port = free_port()
    if mode == "starttls":
        controller = Controller(box, hostname="127.0.0.1", port=port, tls_context=server_ctx, require_starttls=True)
    else:
        controller = Controller(box, hostname="127.0.0.1", port=port, ssl_context=server_ctx)
    controller.start()
    (tmp_path / "import").mkdir()
    path = write_config(tmp_path, vendor, **{"alerts.smtp": {"host": "127.0.0.1", "port": port, mode: True,
                                                              "ca_file": str(cert), "timeout_seconds": 5}})
    server = Server(config_mod.load(path, environ={}), clock=Clock())
    await server.start()
    try:
        await server.services.store.set_alert_recipients("ops@example.com")
        await server.services.alerts.send_test()
        await server.services.alerts.deliver_due()
        await wait_for(lambda: box.to("ops@example.com"))
        [alert] = await server.services.store.alert_history(1)
        assert [d.state for d in alert.deliveries] == ["sent"]
    finally:
        await server.stop()
        controller.stop()
