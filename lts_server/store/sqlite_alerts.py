"""SQLite operations of usage alerts: settings, open conditions and the durable outbox.

Kept apart from the licensing writes: these run in their own small
transactions and never share one with a device's commit. A check's
condition levels, its notification and one delivery row per recipient and
webhook become durable together, so a notification is never lost between
"decided" and "queued", and a delivery marked sent is never sent again.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from lts_server.store import AlertCheck, AlertSettings, Delivery, Notification, OpenCondition, SentAlert, Webhook

_DELIVERY_COLUMNS = (
    "d.id, d.alert_id, d.channel, d.target, d.webhook_id, d.state, d.attempts, d.next_ms, d.last_error, d.sent_ms,"
    " a.created_ms, a.subject, a.type, a.conditions"
)


def _delivery(row: tuple[Any, ...]) -> Delivery:
    return Delivery(*row[:13], conditions=json.loads(row[13]))


class AlertsMixin:
    """Mixed into SQLiteStore; relies on its `_all` and `_transaction`."""

    async def code_requests_since(self, since_ms: int) -> dict[str, tuple[int, int]]:
        """(granted, refused) handshakes per code in 3-minute rollup buckets from since_ms on."""
        rows = await self._all(  # type: ignore[attr-defined]
            "SELECT key, SUM(granted), SUM(refused) FROM rollups WHERE scope = 'code' AND size = '3m'"
            " AND bucket_ms >= ? GROUP BY key", (since_ms,))
        return {r[0]: (r[1], r[2]) for r in rows}

    async def alert_settings(self) -> AlertSettings:
        rows = await self._all("SELECT recipients, disabled_kinds FROM alert_settings WHERE id = 1")  # type: ignore[attr-defined]
        hooks = await self._all("SELECT id, url, secret, created_ms FROM alert_webhooks ORDER BY id")  # type: ignore[attr-defined]
        recipients, disabled = rows[0] if rows else ("", "[]")
        return AlertSettings(recipients, frozenset(json.loads(disabled)), tuple(Webhook(*h) for h in hooks))

    async def set_alert_recipients(self, recipients: str) -> None:
        await self._transaction(lambda con: con.execute(  # type: ignore[attr-defined]
            "UPDATE alert_settings SET recipients = ? WHERE id = 1", (recipients,)))

    async def set_disabled_alert_kinds(self, kinds: frozenset[str]) -> None:
        await self._transaction(lambda con: con.execute(  # type: ignore[attr-defined]
            "UPDATE alert_settings SET disabled_kinds = ? WHERE id = 1", (json.dumps(sorted(kinds)),)))

    async def add_webhook(self, url: str, secret: str, at_ms: int) -> Webhook:
        def run(con: sqlite3.Connection) -> Webhook:
            cur = con.execute("INSERT INTO alert_webhooks (url, secret, created_ms) VALUES (?,?,?)",
                              (url, secret, at_ms))
            return Webhook(cur.lastrowid or 0, url, secret, at_ms)

        return await self._transaction(run)  # type: ignore[attr-defined]

    async def delete_webhook(self, webhook_id: int) -> bool:
        """Remove a webhook; its undelivered notifications are given up, saying why."""

        def run(con: sqlite3.Connection) -> bool:
            con.execute("UPDATE alert_deliveries SET state = 'failed', last_error = 'the webhook was removed'"
                        " WHERE webhook_id = ? AND state = 'pending'", (webhook_id,))
            return con.execute("DELETE FROM alert_webhooks WHERE id = ?", (webhook_id,)).rowcount == 1

        return await self._transaction(run)  # type: ignore[attr-defined]

    async def open_conditions(self) -> list[OpenCondition]:
        rows = await self._all(  # type: ignore[attr-defined]
            "SELECT key, kind, subject, level, label, message, link, since_ms, notified_ms FROM alert_conditions"
            " ORDER BY key")
        return [OpenCondition(*r) for r in rows]

    async def record_alert_check(self, check: AlertCheck) -> int | None:
        """Store the conditions met now, drop the cleared ones, queue the notification; one transaction."""

        def run(con: sqlite3.Connection) -> int | None:
            con.executemany(
                "INSERT INTO alert_conditions (key, kind, subject, level, label, message, link, since_ms,"
                " notified_ms) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (key) DO UPDATE SET level = excluded.level,"
                " label = excluded.label, message = excluded.message, link = excluded.link,"
                " notified_ms = CASE WHEN excluded.level > alert_conditions.level THEN excluded.notified_ms"
                " ELSE alert_conditions.notified_ms END",
                [(c.key, c.kind, c.subject, c.level, c.label, c.message, c.link, c.since_ms, c.notified_ms)
                 for c in check.met])
            con.executemany("DELETE FROM alert_conditions WHERE key = ?", [(k,) for k in check.cleared])
            if check.notification is None:
                return None
            return _enqueue(con, check.at_ms, check.notification)

        return await self._transaction(run)  # type: ignore[attr-defined]

    async def enqueue_notification(self, at_ms: int, notification: Notification) -> int:
        return await self._transaction(lambda con: _enqueue(con, at_ms, notification))  # type: ignore[attr-defined]

    async def due_deliveries(self, now_ms: int, limit: int = 100) -> list[Delivery]:
        """Pending deliveries due now, oldest first; none to a receiver whose older delivery waits for its retry."""
        rows = await self._all(  # type: ignore[attr-defined]
            f"SELECT {_DELIVERY_COLUMNS} FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id"
            " WHERE d.state = 'pending' AND d.next_ms <= ? AND NOT EXISTS (SELECT 1 FROM alert_deliveries e"
            " WHERE e.state = 'pending' AND e.channel = d.channel AND e.target = d.target AND e.id < d.id"
            " AND e.next_ms > ?) ORDER BY d.id LIMIT ?", (now_ms, now_ms, limit))
        return [_delivery(r) for r in rows]

    async def mark_delivered(self, delivery_id: int, at_ms: int) -> None:
        await self._transaction(lambda con: con.execute(  # type: ignore[attr-defined]
            "UPDATE alert_deliveries SET state = 'sent', sent_ms = ?, attempts = attempts + 1, last_error = NULL"
            " WHERE id = ?", (at_ms, delivery_id)))

    async def mark_retry(self, delivery_id: int, next_ms: int, error: str, give_up: bool = False) -> None:
        await self._transaction(lambda con: con.execute(  # type: ignore[attr-defined]
            "UPDATE alert_deliveries SET state = ?, attempts = attempts + 1, next_ms = ?, last_error = ?"
            " WHERE id = ?", ("failed" if give_up else "pending", next_ms, error[:500], delivery_id)))

    async def alert_history(self, limit: int = 50, before_id: int | None = None) -> list[SentAlert]:
        alerts = await self._all(  # type: ignore[attr-defined]
            "SELECT id, created_ms, type, subject, conditions FROM alerts WHERE id < ? ORDER BY id DESC LIMIT ?",
            (before_id if before_id is not None else 2**62, limit))
        if not alerts:
            return []
        ids = [a[0] for a in alerts]
        rows = await self._all(  # type: ignore[attr-defined]
            f"SELECT {_DELIVERY_COLUMNS} FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id"
            f" WHERE d.alert_id IN ({','.join('?' * len(ids))}) ORDER BY d.id", ids)
        by_alert: dict[int, list[Delivery]] = {}
        for r in rows:
            d = _delivery(r)
            by_alert.setdefault(d.alert_id, []).append(d)
        return [SentAlert(a[0], a[1], a[2], a[3], json.loads(a[4]), tuple(by_alert.get(a[0], ())))
                for a in alerts]


def _enqueue(con: sqlite3.Connection, at_ms: int, n: Notification) -> int:
    """The notification and one pending delivery per recipient and webhook configured now."""
    cur = con.execute("INSERT INTO alerts (created_ms, type, subject, conditions) VALUES (?,?,?,?)",
                      (at_ms, n.type, n.subject, json.dumps(n.conditions, separators=(",", ":"))))
    alert_id = cur.lastrowid
    recipients = con.execute("SELECT recipients FROM alert_settings WHERE id = 1").fetchone()[0]
    rows: list[tuple[Any, ...]] = [(alert_id, "email", address, None, at_ms) for address in split_recipients(recipients)]
    rows += [(alert_id, "webhook", url, hook_id, at_ms)
             for hook_id, url in con.execute("SELECT id, url FROM alert_webhooks ORDER BY id")]
    con.executemany("INSERT INTO alert_deliveries (alert_id, channel, target, webhook_id, next_ms) VALUES (?,?,?,?,?)",
                    rows)
    assert alert_id is not None
    return alert_id


def split_recipients(text: str) -> list[str]:
    """'a@x; b@y' -> ['a@x', 'b@y']: semicolons separate, as in the reference."""
    return [a.strip() for a in text.split(";") if a.strip()]
