"""The SQL of usage alerts, as procedures every store runs (see store/sql.py), and the store methods over them.

Kept apart from the licensing writes: these run in their own small
transactions, never in a device's commit. A check decides what is new inside
its transaction (it reads the levels already notified there), so two
processes or nodes checking at once never raise the same alert twice; the
levels, the notification and one delivery per recipient and webhook become
durable together. A sender claims a delivery before trying it and marks it
sent after the receiver accepted it, so a delivery marked sent is never sent
again, by this process or any other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TypeVar

from lts_server.core import alerts as rules
from lts_server.store import (
    AlertSettings,
    CheckRecorded,
    Delivery,
    Notification,
    OpenCondition,
    SentAlert,
    Webhook,
)
from lts_server.store.sql import Exec, Many, Procedure, Query

T = TypeVar("T")

CONDITION_COLUMNS = "key, kind, subject, level, label, message, link, since_ms, notified_ms"
DELIVERY_COLUMNS = (
    "d.id, d.alert_id, d.channel, d.target, d.webhook_id, d.state, d.attempts, d.next_ms, d.last_error, d.sent_ms,"
    " a.created_ms, a.subject, a.type, a.conditions"
)
# A level notified this recently is neither lowered nor cleared (see core.alerts.transition).
SETTLE_MS = 60_000
# Ids are INTEGER (32-bit in PostgreSQL): one past the largest is "no page bound" for ?before=.
NO_BOUND = 2**31 - 1


def split_recipients(text: str) -> list[str]:
    """'a@x; b@y' -> ['a@x', 'b@y']: semicolons separate, as in the reference."""
    return [a.strip() for a in text.split(";") if a.strip()]


def _delivery(row: tuple[Any, ...]) -> Delivery:
    return Delivery(*row[:13], conditions=json.loads(row[13]))


def _next_id(table: str) -> Procedure[int]:
    """One more than the largest id: the writing transaction holds the lock, so no one else takes it."""
    rows = yield Query(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {table}")
    return int(rows[0][0])


def code_requests_since(since_ms: int) -> Procedure[dict[str, tuple[int, int]]]:
    rows = yield Query("SELECT key, SUM(granted), SUM(refused) FROM rollups WHERE scope = 'code' AND size = '3m'"
                       " AND bucket_ms >= ? GROUP BY key", (since_ms,))
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


def alert_settings() -> Procedure[AlertSettings]:
    rows = yield Query("SELECT recipients, disabled_kinds FROM alert_settings WHERE id = 1")
    hooks = yield Query("SELECT id, url, secret, created_ms FROM alert_webhooks ORDER BY id")
    recipients, disabled = rows[0] if rows else ("", "[]")
    return AlertSettings(recipients, frozenset(json.loads(disabled)), tuple(Webhook(*h) for h in hooks))


def set_alert_recipients(recipients: str) -> Procedure[None]:
    yield Exec("INSERT INTO alert_settings (id, recipients) VALUES (1, ?)"
               " ON CONFLICT (id) DO UPDATE SET recipients = excluded.recipients", (recipients,))


def set_disabled_alert_kinds(kinds: frozenset[str]) -> Procedure[None]:
    yield Exec("INSERT INTO alert_settings (id, disabled_kinds) VALUES (1, ?)"
               " ON CONFLICT (id) DO UPDATE SET disabled_kinds = excluded.disabled_kinds",
               (json.dumps(sorted(kinds)),))


def add_webhook(url: str, secret: str, at_ms: int) -> Procedure[Webhook]:
    hook_id = yield from _next_id("alert_webhooks")
    yield Exec("INSERT INTO alert_webhooks (id, url, secret, created_ms) VALUES (?,?,?,?)",
               (hook_id, url, secret, at_ms))
    return Webhook(hook_id, url, secret, at_ms)


def delete_webhook(webhook_id: int) -> Procedure[bool]:
    """Remove a webhook; its undelivered notifications are given up, saying why."""
    yield Exec("UPDATE alert_deliveries SET state = 'failed', last_error = 'the webhook was removed'"
               " WHERE webhook_id = ? AND state = 'pending'", (webhook_id,))
    return (yield Exec("DELETE FROM alert_webhooks WHERE id = ?", (webhook_id,))) == 1


def open_conditions() -> Procedure[list[OpenCondition]]:
    rows = yield Query(f"SELECT {CONDITION_COLUMNS} FROM alert_conditions ORDER BY key")
    return [OpenCondition(*r) for r in rows]


def record_check(at_ms: int, met: tuple[rules.Condition, ...]) -> Procedure[CheckRecorded]:
    """Compare the conditions met now with the levels notified (read here, in the transaction), store the
    new levels, drop what cleared, and queue one notification for everything new."""
    previous = {r[0]: OpenCondition(*r) for r in (yield Query(f"SELECT {CONDITION_COLUMNS} FROM alert_conditions"))}
    settling = frozenset(k for k, c in previous.items() if at_ms - c.notified_ms < SETTLE_MS)
    t = rules.transition(met, {k: c.level for k, c in previous.items()}, settling)
    # Only rows that changed are written: a steady check holds the write lock briefly.
    changed = [c for c in met if t.levels[c.key] == c.level and (
        (before := previous.get(c.key)) is None
        or (before.level, before.label, before.message, before.link) != (c.level, c.label, c.message, c.link))]
    for c in changed:
        before = previous.get(c.key)
        if before is None:
            yield Exec(f"INSERT INTO alert_conditions ({CONDITION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                       (c.key, c.kind.value, c.subject, c.level, c.label, c.message, c.link, at_ms, at_ms))
        else:
            yield Exec("UPDATE alert_conditions SET level = ?, label = ?, message = ?, link = ?, notified_ms = ?"
                       " WHERE key = ?", (c.level, c.label, c.message, c.link,
                                          at_ms if c.level > before.level else before.notified_ms, c.key))
    if t.cleared:
        yield Many("DELETE FROM alert_conditions WHERE key = ?", [(k,) for k in t.cleared])
    alert_id = None
    if t.new:
        alert_id = yield from enqueue(at_ms, Notification("alert", rules.subject_line(t.new),
                                                          [rules.condition_json(c) for c in t.new]))
    return CheckRecorded(t.new, t.cleared, alert_id, t.levels)


def enqueue(at_ms: int, n: Notification) -> Procedure[int]:
    """The notification and one pending delivery per recipient and webhook configured now."""
    alert_id = yield from _next_id("alerts")
    yield Exec("INSERT INTO alerts (id, created_ms, type, subject, conditions) VALUES (?,?,?,?,?)",
               (alert_id, at_ms, n.type, n.subject, json.dumps(n.conditions, separators=(",", ":"))))
    settings = yield from alert_settings()
    targets: list[tuple[str, str, int | None]] = [("email", a, None) for a in split_recipients(settings.recipients)]
    targets += [("webhook", h.url, h.id) for h in settings.webhooks]
    first = yield from _next_id("alert_deliveries")
    yield Many("INSERT INTO alert_deliveries (id, alert_id, channel, target, webhook_id, next_ms) VALUES (?,?,?,?,?,?)",
               [(first + i, alert_id, channel, target, hook, at_ms) for i, (channel, target, hook) in enumerate(targets)])
    return alert_id


def due_deliveries(now_ms: int, limit: int) -> Procedure[list[Delivery]]:
    """Pending deliveries due now and not held by a sender, oldest first; none to a receiver whose older
    delivery still waits (for its retry, or in another sender's hands), so each receiver gets them in order."""
    rows = yield Query(
        f"SELECT {DELIVERY_COLUMNS} FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id"
        " WHERE d.state = 'pending' AND d.next_ms <= ? AND COALESCE(d.claimed_until_ms, 0) <= ?"
        " AND NOT EXISTS (SELECT 1 FROM alert_deliveries e WHERE e.state = 'pending' AND e.channel = d.channel"
        " AND e.target = d.target AND e.id < d.id AND (e.next_ms > ? OR COALESCE(e.claimed_until_ms, 0) > ?))"
        " ORDER BY d.id LIMIT ?", (now_ms, now_ms, now_ms, now_ms, limit))
    return [_delivery(r) for r in rows]


def claim_delivery(delivery_id: int, now_ms: int, until_ms: int) -> Procedure[bool]:
    """Hold a delivery while trying it; False when it was sent, given up, or is held by another sender."""
    changed = yield Exec("UPDATE alert_deliveries SET claimed_until_ms = ? WHERE id = ? AND state = 'pending'"
                         " AND COALESCE(claimed_until_ms, 0) <= ?", (until_ms, delivery_id, now_ms))
    return changed == 1


def retry_now(now_ms: int) -> Procedure[int]:
    """Every pending delivery waiting for a later try becomes due now; returns how many are pending."""
    yield Exec("UPDATE alert_deliveries SET next_ms = ? WHERE state = 'pending' AND next_ms > ?", (now_ms, now_ms))
    rows = yield Query("SELECT COUNT(*) FROM alert_deliveries WHERE state = 'pending'")
    return int(rows[0][0])


def mark_delivered(delivery_id: int, at_ms: int) -> Procedure[None]:
    yield Exec("UPDATE alert_deliveries SET state = 'sent', sent_ms = ?, attempts = attempts + 1, last_error = NULL,"
               " claimed_until_ms = NULL WHERE id = ?", (at_ms, delivery_id))


def mark_retry(delivery_id: int, next_ms: int, error: str, give_up: bool) -> Procedure[None]:
    yield Exec("UPDATE alert_deliveries SET state = ?, attempts = attempts + 1, next_ms = ?, last_error = ?,"
               " claimed_until_ms = NULL WHERE id = ?", ("failed" if give_up else "pending", next_ms, error[:500],
                                                         delivery_id))


def alert_history(limit: int, before_id: int | None) -> Procedure[list[SentAlert]]:
    alerts = yield Query("SELECT id, created_ms, type, subject, conditions FROM alerts WHERE id < ?"
                         " ORDER BY id DESC LIMIT ?", (before_id if before_id is not None else NO_BOUND, limit))
    if not alerts:
        return []
    ids = [a[0] for a in alerts]
    rows = yield Query(f"SELECT {DELIVERY_COLUMNS} FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id"
                       f" WHERE d.alert_id IN ({','.join('?' * len(ids))}) ORDER BY d.id", tuple(ids))
    by_alert: dict[int, list[Delivery]] = {}
    for r in rows:
        d = _delivery(r)
        by_alert.setdefault(d.alert_id, []).append(d)
    return [SentAlert(a[0], a[1], a[2], a[3], json.loads(a[4]), tuple(by_alert.get(a[0], ()))) for a in alerts]


class AlertOperations:
    """The alert operations of a store, mixed into SQLiteStore and PostgresStore.

    Each runs one procedure in one transaction through the store's `_call`;
    `ALERT_LOCK` (PostgreSQL) makes alert transactions of all nodes take turns.
    """

    ALERT_LOCK: int | None = None

    async def _alerts(self, proc: Procedure[T]) -> T:
        call = self._call  # type: ignore[attr-defined]
        return await (call(proc) if self.ALERT_LOCK is None else call(proc, self.ALERT_LOCK))

    async def code_requests_since(self, since_ms: int) -> dict[str, tuple[int, int]]:
        """(granted, refused) handshakes per code in 3-minute rollup buckets from since_ms on."""
        return await self._alerts(code_requests_since(since_ms))

    async def alert_settings(self) -> AlertSettings:
        return await self._alerts(alert_settings())

    async def set_alert_recipients(self, recipients: str) -> None:
        await self._alerts(set_alert_recipients(recipients))

    async def set_disabled_alert_kinds(self, kinds: frozenset[str]) -> None:
        await self._alerts(set_disabled_alert_kinds(kinds))

    async def add_webhook(self, url: str, secret: str, at_ms: int) -> Webhook:
        return await self._alerts(add_webhook(url, secret, at_ms))

    async def delete_webhook(self, webhook_id: int) -> bool:
        return await self._alerts(delete_webhook(webhook_id))

    async def open_conditions(self) -> list[OpenCondition]:
        return await self._alerts(open_conditions())

    async def record_alert_check(self, at_ms: int, met: Iterable[rules.Condition]) -> CheckRecorded:
        return await self._alerts(record_check(at_ms, tuple(met)))

    async def enqueue_notification(self, at_ms: int, notification: Notification) -> int:
        return await self._alerts(enqueue(at_ms, notification))

    async def due_deliveries(self, now_ms: int, limit: int = 100) -> list[Delivery]:
        return await self._alerts(due_deliveries(now_ms, limit))

    async def claim_delivery(self, delivery_id: int, now_ms: int, until_ms: int) -> bool:
        return await self._alerts(claim_delivery(delivery_id, now_ms, until_ms))

    async def retry_deliveries_now(self, now_ms: int) -> int:
        return await self._alerts(retry_now(now_ms))

    async def mark_delivered(self, delivery_id: int, at_ms: int) -> None:
        await self._alerts(mark_delivered(delivery_id, at_ms))

    async def mark_retry(self, delivery_id: int, next_ms: int, error: str, give_up: bool = False) -> None:
        await self._alerts(mark_retry(delivery_id, next_ms, error, give_up))

    async def alert_history(self, limit: int = 50, before_id: int | None = None) -> list[SentAlert]:
        return await self._alerts(alert_history(limit, before_id))
