-- Usage alerts: who is told, which conditions are open at which level, and
-- the durable outbox of notifications and their deliveries. Ids are given by
-- the store (one more than the largest, inside the writing transaction), so
-- the same SQL serves SQLite and PostgreSQL.

-- At most one row (id 1, written at the first change; none means no
-- recipient and every kind on): e-mail recipients (separated by semicolons,
-- as an admin types them) and the kinds of condition switched off (a JSON
-- array). No row is written here, so `lts-server migrate --to` finds the
-- new database empty.
CREATE TABLE alert_settings (
    id             INTEGER PRIMARY KEY,
    recipients     TEXT NOT NULL DEFAULT '',
    disabled_kinds TEXT NOT NULL DEFAULT '[]'
);

-- The secret signs each delivery (HMAC-SHA256), so it is kept as given.
CREATE TABLE alert_webhooks (
    id         INTEGER PRIMARY KEY,
    url        TEXT NOT NULL,
    secret     TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- Conditions met at the last check, with the level already notified.
CREATE TABLE alert_conditions (
    key         TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    level       INTEGER NOT NULL,
    label       TEXT NOT NULL,
    message     TEXT NOT NULL,
    link        TEXT NOT NULL,
    since_ms    BIGINT NOT NULL,
    notified_ms BIGINT NOT NULL
);

-- One notification: every condition newly met by one check (or a test).
CREATE TABLE alerts (
    id         INTEGER PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    type       TEXT NOT NULL,
    subject    TEXT NOT NULL,
    conditions TEXT NOT NULL
);

-- The outbox: one row per notification and recipient or webhook, written in
-- the same transaction as the notification, retried until sent. (alert_id
-- names a row of alerts; no foreign key, so tables copy in any order.)
CREATE TABLE alert_deliveries (
    id         INTEGER PRIMARY KEY,
    alert_id   INTEGER NOT NULL,
    channel    TEXT NOT NULL,
    target     TEXT NOT NULL,
    webhook_id INTEGER,
    state      TEXT NOT NULL DEFAULT 'pending',
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_ms    BIGINT NOT NULL,
    last_error TEXT,
    sent_ms    BIGINT,
    -- A sender (any process, any node) holds a delivery while it tries it.
    claimed_until_ms BIGINT
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (state, next_ms);
CREATE INDEX alert_deliveries_alert ON alert_deliveries (alert_id);
