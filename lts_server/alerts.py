"""Usage alerts, the shell: run checks, queue notifications in the outbox, deliver them.

The rules live in core/alerts.py; this module gathers their facts from the
ledger and the store, has the store decide and make durable what is new
(levels, notification and one delivery per recipient and webhook, in one
transaction: store/sql_alerts.py), and works the outbox: each pending
delivery is claimed, tried in order per receiver, retried with exponential
backoff (also after a restart, since the outbox is the database), and marked
sent once the receiver accepted it, so it is never sent again.
The one window left: a crash between a receiver's "accepted" and our
commit of "sent" sends that delivery once more; the alert id in every
message (Message-ID, X-LTS-Alert-Id, "alertId") lets a receiver drop it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import smtplib
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

import aiohttp

import lts_server
from lts_server import logs
from lts_server.config import AlertsSection, duration_seconds
from lts_server.core import alerts as rules
from lts_server.core.times import from_ms, iso, to_ms
from lts_server.ledger import Ledger
from lts_server.metrics import Metrics
from lts_server.store import Delivery, Notification, OpenCondition, Store, Webhook

SIGNATURE_HEADER = "X-LTS-Signature"
FIRST_RETRY_SECONDS = 5.0
WEBHOOK_TIMEOUT_SECONDS = 10.0
# How long a sender holds a delivery it tries: longer than any one try can take.
CLAIM_MS = 5 * 60 * 1000
# An alert for something that happened (a clock behind, a clone) is raised at most this often per subject.
RAISE_SECONDS = 3600.0


class DeliveryFailed(Exception):
    """A try that did not reach the receiver; the message says why, for the history."""


@dataclass(frozen=True)
class CheckOutcome:
    new: tuple[rules.Condition, ...]
    cleared: tuple[str, ...]
    alert_id: int | None


def signature(secret: str, body: bytes) -> str:
    """The value of the X-LTS-Signature header: sha256=<hex HMAC-SHA256 of the exact body>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Alerter:
    def __init__(self, config: AlertsSection, smtp_password_path: Path | None, store: Store, ledger: Ledger,
                 server_uuid: str, metrics: Metrics | None = None, smtp_ca_path: Path | None = None) -> None:
        self.config = config
        self.smtp_password_path = smtp_password_path
        self.smtp_ca_path = smtp_ca_path
        self.store = store
        self.ledger = ledger
        self.server_uuid = server_uuid
        self.metrics = metrics
        self.window = rules.FailureWindow(config.failure_window_minutes, config.failure_min_requests)
        self._check_lock = asyncio.Lock()
        self._deliver_lock = asyncio.Lock()
        self._wake_check = asyncio.Event()
        self._wake_outbox = asyncio.Event()
        # The notified level per open condition, as of the last check: lets a
        # usage report tell cheaply whether it crossed a level.
        self._levels: dict[str, int] = {}
        # When each happening was last raised (raise_now), and the notifications being queued.
        self._raised: dict[str, float] = {}
        self._raising: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._levels = {c.key: c.level for c in await self.store.open_conditions()}

    # -- checks -----------------------------------------------------------------

    async def check(self) -> CheckOutcome:
        """Evaluate every condition now; queue one notification holding all newly met ones."""
        async with self._check_lock:
            started = time.perf_counter()
            now, met = await self.current()
            # What is new is decided in the store's transaction, against the levels notified there.
            recorded = await self.store.record_alert_check(to_ms(now), met)
            self._levels = recorded.levels
            if self.metrics:
                self.metrics.alert_checks.inc()
                self.metrics.alert_check_latency.observe(time.perf_counter() - started)
            if recorded.alert_id is not None:
                if self.metrics:
                    self.metrics.alerts.labels("alert").inc()
                logs.event("alerts.raised", alert_id=recorded.alert_id, conditions=[c.key for c in recorded.new])
                self._wake_outbox.set()
            return CheckOutcome(recorded.new, recorded.cleared, recorded.alert_id)

    async def current(self) -> tuple[datetime, list[rules.Condition]]:
        """The conditions of the enabled kinds met right now (what a check would see), and that now."""
        settings = await self.store.alert_settings()
        enabled = frozenset(k for k in rules.Kind if k.value not in settings.disabled_kinds)
        now = self.ledger.clock()
        since = now - timedelta(minutes=self.window.minutes)
        requests = {code: rules.CodeRequests(g, r)
                    for code, (g, r) in (await self.store.code_requests_since(to_ms(since))).items()}
        # From here on nothing awaits: the ledger's state is read in one go.
        rejected = tuple(rules.RejectedFile(r.path, r.reason or "rejected") for r in self.ledger.open_rejections())
        facts = rules.Facts(self.ledger.items, self.ledger.statuses, requests, rejected)
        return now, rules.conditions(facts, now, self.window, enabled)

    def raise_now(self, kind: str, subject: str, label: str, message: str, link: str) -> None:
        """An alert for something that happened rather than a condition a check finds (rules.CLOCK_ALERT,
        rules.CLONE_ALERT): queued at once to every receiver, at most once per RAISE_SECONDS per subject."""
        key = f"{kind}:{subject}"
        now = time.monotonic()
        if key in self._raised and now - self._raised[key] < RAISE_SECONDS:
            return
        self._raised[key] = now
        task = asyncio.ensure_future(self._raise(key, kind, subject, label, message, link))
        self._raising.add(task)
        task.add_done_callback(self._raising.discard)

    async def _raise(self, key: str, kind: str, subject: str, label: str, message: str, link: str) -> None:
        try:
            condition = {"key": key, "kind": kind, "subject": subject, "level": 1, "label": label,
                         "message": message, "link": link}
            alert_id = await self.store.enqueue_notification(to_ms(self.ledger.clock()), Notification(
                "alert", f"[lts-server] alert: {kind} {subject} {label}", [condition]))
        except Exception as e:  # the log has it; the next occurrence after RAISE_SECONDS tries again
            self._raised.pop(key, None)
            logs.event("alerts.raise_failed", logs.logging.ERROR, key=key, error=str(e))
            return
        if self.metrics:
            self.metrics.alerts.labels("alert").inc()
        logs.event("alerts.raised", alert_id=alert_id, conditions=[key])
        self._wake_outbox.set()

    def request_check(self) -> None:
        """Ask for a check at once (after an import, or a report that crossed a level)."""
        self._wake_check.set()

    def after_usage(self, item_ids: Iterable[str]) -> None:
        """Check at once if units or overuse just counted took an item past a level not yet notified.

        Cheap (the rules of the named items only), so it runs after every usage report and roll-up.
        """
        now = self.ledger.clock()
        for item_id in item_ids:
            item = self.ledger.items.get(item_id)
            if item is None:
                continue
            for c in rules.item_conditions(item, self.ledger.status(item_id), now):
                if c.kind in (rules.Kind.UNITS, rules.Kind.OVERUSE) and c.level > self._levels.get(c.key, 0):
                    self.request_check()
                    return

    async def run_checks(self, stopping: asyncio.Event) -> None:
        """Check every check_seconds, and at once when asked."""
        while not stopping.is_set():
            try:
                await asyncio.wait_for(self._wake_check.wait(), timeout=self.config.check_seconds)
            except TimeoutError:
                pass
            self._wake_check.clear()
            if stopping.is_set():
                return
            try:
                await self.check()
            except Exception as e:  # retried at the next tick
                logs.event("alerts.check_failed", logs.logging.ERROR, error=str(e))

    def reconfigure(self, config: AlertsSection, smtp_password_path: Path | None, smtp_ca_path: Path | None) -> bool:
        """A new [alerts] section (SIGHUP); True when it changed, and then the outbox is retried now."""
        changed = (config, smtp_password_path, smtp_ca_path) != (self.config, self.smtp_password_path,
                                                                 self.smtp_ca_path)
        self.config, self.smtp_password_path, self.smtp_ca_path = config, smtp_password_path, smtp_ca_path
        self.window = rules.FailureWindow(config.failure_window_minutes, config.failure_min_requests)
        return changed

    async def retry_now(self) -> int:
        """Every pending delivery is tried at the next round, which starts now (a configuration change,
        `ltsctl alerts retry`): nothing waits behind the backoff of failures the change may have fixed.
        Returns how many deliveries are pending."""
        pending = await self.store.retry_deliveries_now(to_ms(self.ledger.clock()))
        self._wake_outbox.set()
        logs.event("alerts.retry_now", pending=pending)
        return pending

    async def send_test(self) -> int:
        """Queue a test notification to every recipient and webhook; returns its alert id."""
        text = (f"This is a test notification from lts-server {self.server_uuid}: alerts reach this receiver.")
        notification = Notification("test", "[lts-server] test notification", [
            {"key": "test", "kind": "test", "subject": self.server_uuid, "level": 0, "label": "test",
             "message": text, "link": "/portal/alerts"}])
        alert_id = await self.store.enqueue_notification(to_ms(self.ledger.clock()), notification)
        if self.metrics:
            self.metrics.alerts.labels("test").inc()
        self._wake_outbox.set()
        return alert_id

    # -- the outbox -------------------------------------------------------------

    async def idle(self) -> None:
        """Wait until no delivery round is under way (so a stop never cuts a send in half)."""
        async with self._deliver_lock:
            pass

    async def run_outbox(self, stopping: asyncio.Event) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_SECONDS)) as session:
            while not stopping.is_set():
                try:
                    await self.deliver_due(session)
                except Exception as e:  # the outbox is in the database: the next round picks it up
                    logs.event("alerts.outbox_failed", logs.logging.ERROR, error=str(e))
                try:
                    await asyncio.wait_for(self._wake_outbox.wait(), timeout=self.config.deliver_seconds)
                except TimeoutError:
                    pass
                self._wake_outbox.clear()

    async def deliver_due(self, session: aiohttp.ClientSession | None = None) -> int:
        """Try every delivery that is due, oldest first; returns how many were sent.

        After a failure, later deliveries to the same receiver wait for the next
        round, so a receiver that comes back gets its notifications in order.
        """
        async with self._deliver_lock:
            if session is None:
                async with aiohttp.ClientSession(
                        timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_SECONDS)) as own:
                    return await self._deliver_due(own)
            return await self._deliver_due(session)

    async def _deliver_due(self, session: aiohttp.ClientSession) -> int:
        now = self.ledger.clock()
        due = await self.store.due_deliveries(to_ms(now))
        if not due:
            return 0
        hooks = {h.id: h for h in (await self.store.alert_settings()).webhooks}
        blocked: set[tuple[str, str]] = set()
        sent = 0
        # Alerts older than max_age go to each receiver as one summary, oldest first, before newer ones.
        stale_before = to_ms(now) - int(duration_seconds(self.config.max_age) * 1000)
        stale: dict[tuple[str, str], list[Delivery]] = {}
        for d in due:
            if d.created_ms < stale_before and d.type == "alert":
                stale.setdefault((d.channel, d.target), []).append(d)
        for receiver, group in stale.items():
            if len(group) > 1:
                sent += await self._deliver_summary(session, receiver, group, hooks, blocked)
        summarized = {d.id for group in stale.values() if len(group) > 1 for d in group}
        for d in due:
            if (d.channel, d.target) in blocked or d.id in summarized:
                continue
            now_ms = to_ms(self.ledger.clock())
            if not await self.store.claim_delivery(d.id, now_ms, now_ms + CLAIM_MS):
                continue  # sent meanwhile, or another sender holds it
            try:
                if d.channel == "email":
                    await self._send_mail(d)
                else:
                    await self._post(session, d, hooks.get(d.webhook_id or 0))
            except DeliveryFailed as e:
                blocked.add((d.channel, d.target))
                await self._failed(d, str(e))
                continue
            await self.store.mark_delivered(d.id, to_ms(self.ledger.clock()))
            sent += 1
            if self.metrics:
                self.metrics.alert_deliveries.labels(d.channel, "sent").inc()
            logs.event("alerts.delivered", alert_id=d.alert_id, delivery_id=d.id, channel=d.channel,
                       target=d.target, attempts=d.attempts + 1)
        return sent

    async def _deliver_summary(self, session: aiohttp.ClientSession, receiver: tuple[str, str],
                               group: list[Delivery], hooks: dict[int, Webhook], blocked: set[tuple[str, str]]) -> int:
        """One message for several stale alerts to one receiver; each delivery is marked sent with it."""
        now_ms = to_ms(self.ledger.clock())
        claimed = [d for d in group if await self.store.claim_delivery(d.id, now_ms, now_ms + CLAIM_MS)]
        if not claimed:
            return 0
        channel, target = receiver
        first, last = claimed[0], claimed[-1]
        n = len(claimed)
        summary = Delivery(
            id=first.id, alert_id=last.alert_id, channel=channel, target=target, webhook_id=first.webhook_id,
            state="pending", attempts=first.attempts, next_ms=now_ms, last_error=None, sent_ms=None,
            created_ms=first.created_ms, type="summary",
            subject=f"[lts-server] {n} alerts held back since {iso(from_ms(first.created_ms))}",
            conditions=[{**c, "alertId": d.alert_id, "raisedAt": iso(from_ms(d.created_ms))}
                        for d in claimed for c in d.conditions])
        try:
            if channel == "email":
                await self._send_mail(summary, [d.alert_id for d in claimed])
            else:
                await self._post(session, summary, hooks.get(first.webhook_id or 0), [d.alert_id for d in claimed])
        except DeliveryFailed as e:
            blocked.add(receiver)
            for d in claimed:
                await self._failed(d, str(e))
            return 0
        for d in claimed:
            await self.store.mark_delivered(d.id, to_ms(self.ledger.clock()))
        if self.metrics:
            self.metrics.alert_deliveries.labels(channel, "sent").inc()
        logs.event("alerts.delivered_summary", alert_ids=[d.alert_id for d in claimed], channel=channel,
                   target=target)
        return 1

    async def _failed(self, d: Delivery, error: str) -> None:
        now = self.ledger.clock()
        delay = min(self.config.retry_max_seconds, FIRST_RETRY_SECONDS * 2 ** d.attempts)
        give_up = now - from_ms(d.created_ms) >= timedelta(hours=self.config.give_up_hours)
        await self.store.mark_retry(d.id, to_ms(now + timedelta(seconds=delay)), error, give_up)
        if self.metrics:
            self.metrics.alert_deliveries.labels(d.channel, "failed").inc()
        logs.event("alerts.given_up" if give_up else "alerts.delivery_failed", logs.logging.WARNING,
                   alert_id=d.alert_id, delivery_id=d.id, channel=d.channel, target=d.target,
                   attempts=d.attempts + 1, error=error, retry_in_seconds=None if give_up else delay)

    def _link(self, path: str) -> str:
        base = (self.config.portal_url or "").rstrip("/")
        return base + path if base else path

    def payload(self, d: Delivery, alert_ids: list[int] | None = None) -> dict[str, object]:
        """The JSON a webhook receives; a summary also lists the alerts it stands for."""
        body: dict[str, object] = {
            "alertId": d.alert_id, "type": d.type, "createdAt": iso(from_ms(d.created_ms)),
            "serverUuid": self.server_uuid, "subject": d.subject,
            "conditions": [{**c, "link": self._link(str(c["link"]))} for c in d.conditions]}
        if alert_ids is not None:
            body["alertIds"] = alert_ids
        return body

    def mail_text(self, d: Delivery) -> str:
        when = iso(from_ms(d.created_ms))
        if d.type == "test":
            lines = [d.conditions[0]["message"], ""]
        elif d.type == "summary":
            ids = sorted({int(c["alertId"]) for c in d.conditions})
            lines = [f"lts-server {self.server_uuid} could not deliver {len(ids)} alerts for a while; they are "
                     f"summed up here, oldest first (alerts {', '.join(map(str, ids))}):", ""]
            for c in d.conditions:
                lines += [f"- {c['raisedAt']}: {c['message']}", f"  {self._link(str(c['link']))}"]
            lines.append("")
        else:
            n = len(d.conditions)
            lines = [f"lts-server {self.server_uuid} found {n} new alert condition{'s' if n != 1 else ''} at {when}:",
                     ""]
            for c in d.conditions:
                lines += [f"- {c['message']}", f"  {self._link(str(c['link']))}"]
            lines.append("")
        lines.append(f"Alert {d.alert_id}. Recipients, webhooks and conditions: {self._link('/portal/alerts')}")
        return "\n".join(lines) + "\n"

    async def _post(self, session: aiohttp.ClientSession, d: Delivery, hook: Webhook | None,
                    alert_ids: list[int] | None = None) -> None:
        if hook is None:
            raise DeliveryFailed("the webhook was removed")
        body = json.dumps(self.payload(d, alert_ids), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(hook.secret, body),
                   "X-LTS-Alert-Id": str(d.alert_id), "X-LTS-Delivery-Id": str(d.id),
                   "User-Agent": f"lts-server/{lts_server.__version__}"}
        try:
            async with session.post(d.target, data=body, headers=headers) as resp:
                if not 200 <= resp.status < 300:
                    raise DeliveryFailed(f"{d.target} answered HTTP {resp.status}")
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise DeliveryFailed(f"{d.target}: {type(e).__name__}: {e}") from None

    async def _send_mail(self, d: Delivery, alert_ids: list[int] | None = None) -> None:
        smtp = self.config.smtp
        if not smtp.host:
            raise DeliveryFailed("no SMTP server: set [alerts.smtp] host (the e-mail waits in the outbox)")
        msg = EmailMessage()
        msg["From"] = smtp.from_
        msg["To"] = d.target
        msg["Subject"] = d.subject
        msg["Date"] = format_datetime(from_ms(d.created_ms))
        ids = alert_ids or [d.alert_id]
        msg["Message-ID"] = (f"<alert-{d.alert_id}.{self.server_uuid}@lts-server>" if alert_ids is None else
                             f"<alerts-{ids[0]}-{ids[-1]}.{self.server_uuid}@lts-server>")
        msg["X-LTS-Alert-Id"] = ", ".join(map(str, ids))
        msg.set_content(self.mail_text(d))
        try:
            await asyncio.to_thread(self._smtp_send, msg)
        except (smtplib.SMTPException, OSError, ssl.SSLError) as e:
            raise DeliveryFailed(f"SMTP {smtp.host}:{smtp.port}: {type(e).__name__}: {e}") from None

    def _smtp_send(self, msg: EmailMessage) -> None:
        smtp = self.config.smtp
        assert smtp.host is not None
        context = ssl.create_default_context(cafile=self.smtp_ca_path)
        client: smtplib.SMTP
        if smtp.tls:
            client = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout_seconds, context=context)
        else:
            client = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_seconds)
        with client:
            if smtp.starttls:
                client.starttls(context=context)
            if smtp.username:
                assert self.smtp_password_path is not None
                password = self.smtp_password_path.read_text(encoding="utf-8").splitlines()[0]
                client.login(smtp.username, password)
            client.send_message(msg)


def open_condition_json(c: OpenCondition) -> dict[str, object]:
    return {"key": c.key, "kind": c.kind, "subject": c.subject, "level": c.level, "label": c.label,
            "message": c.message, "link": c.link, "since": iso(from_ms(c.since_ms)),
            "notifiedAt": iso(from_ms(c.notified_ms))}


def delivery_json(d: Delivery) -> dict[str, object]:
    return {"id": d.id, "channel": d.channel, "target": d.target, "state": d.state, "attempts": d.attempts,
            "nextTryAt": iso(from_ms(d.next_ms)) if d.state == "pending" else None, "lastError": d.last_error,
            "sentAt": iso(from_ms(d.sent_ms)) if d.sent_ms else None}
