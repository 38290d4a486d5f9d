-- Usage reports, live authorizations, and the statistics rollups.

ALTER TABLE events ADD COLUMN units BIGINT;
ALTER TABLE events ADD COLUMN instances INTEGER;
CREATE INDEX events_code_at ON events (code, at_ms);
CREATE INDEX events_item_at ON events (item_id, at_ms);

-- Report ids already counted: a repeated report counts nothing.
CREATE TABLE usage_reports (
    report_id   TEXT PRIMARY KEY,
    client_uuid TEXT NOT NULL,
    code        TEXT NOT NULL,
    received_ms BIGINT NOT NULL
);
CREATE INDEX usage_reports_received ON usage_reports (received_ms);

-- The latest grant per (code, device): which item a device's usage is
-- charged to, and the instances a server was granted.
CREATE TABLE authorizations (
    code        TEXT NOT NULL,
    client_uuid TEXT NOT NULL,
    item_id     TEXT NOT NULL,
    instances   INTEGER NOT NULL,
    granted_ms  BIGINT NOT NULL,
    expires_ms  BIGINT NOT NULL,
    PRIMARY KEY (code, client_uuid)
);

-- Rollups, kept up to date from the event log by a background job.
-- WITHOUT ROWID (SQLite): one B-tree per table instead of a table plus its
-- key index, which halves the cost of the many small inserts; a PostgreSQL
-- schema simply omits it.
-- scope: 'code' or 'item'; size: '3m', '2h', '1d' or 'all' (bucket_ms 0).
CREATE TABLE rollups (
    scope      TEXT NOT NULL,
    key        TEXT NOT NULL,
    size       TEXT NOT NULL,
    bucket_ms  BIGINT NOT NULL,
    granted    BIGINT NOT NULL DEFAULT 0,
    refused    BIGINT NOT NULL DEFAULT 0,
    units      BIGINT NOT NULL DEFAULT 0,
    devices    BIGINT NOT NULL DEFAULT 0,
    instances  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, key, size, bucket_ms)
) WITHOUT ROWID;

-- Which devices were active in which bucket, so each counts once.
CREATE TABLE rollup_devices (
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    size        TEXT NOT NULL,
    bucket_ms   BIGINT NOT NULL,
    client_uuid TEXT NOT NULL,
    instances   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, key, size, bucket_ms, client_uuid)
) WITHOUT ROWID;

-- How far the rollup job has read the event log.
CREATE TABLE rollup_state (
    id       INTEGER PRIMARY KEY,
    last_seq BIGINT NOT NULL
);
INSERT INTO rollup_state (id, last_seq) VALUES (1, 0);
