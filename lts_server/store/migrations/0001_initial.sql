-- Licenses, items, handshake codes, seats, import states and the usage-event log.
-- Portable SQL: TEXT/INTEGER/BIGINT only, ISO-8601 UTC text for dates,
-- epoch milliseconds for event times, JSON arrays as TEXT.

CREATE TABLE licenses (
    license_id           TEXT PRIMARY KEY,
    alias                TEXT NOT NULL,
    organization_id      TEXT NOT NULL,
    license_text_version TEXT NOT NULL,
    status               TEXT NOT NULL,
    revision             INTEGER NOT NULL,
    server_uuid          TEXT,
    issued_at            TEXT NOT NULL,
    key_id               TEXT NOT NULL,
    sha256               TEXT NOT NULL,
    file_text            TEXT NOT NULL,
    first_imported_ms    BIGINT NOT NULL,
    updated_ms           BIGINT NOT NULL
);

CREATE TABLE items (
    item_id         TEXT PRIMARY KEY,
    license_id      TEXT NOT NULL REFERENCES licenses (license_id),
    organization_id TEXT NOT NULL,
    product         TEXT NOT NULL,
    edition         TEXT,
    deployment_type TEXT NOT NULL,
    license_type    TEXT NOT NULL,
    quantity        INTEGER NOT NULL,
    period          TEXT,
    domain          TEXT,
    starts_at       TEXT NOT NULL,
    expires_at      TEXT NOT NULL,
    revoked         INTEGER NOT NULL DEFAULT 0,
    seats_used      INTEGER NOT NULL DEFAULT 0,
    units_used      BIGINT NOT NULL DEFAULT 0,
    overuse_used    BIGINT NOT NULL DEFAULT 0,
    overused        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX items_license ON items (license_id);

CREATE TABLE handshake_codes (
    name              TEXT PRIMARY KEY,
    organization_id   TEXT NOT NULL,
    is_default        INTEGER NOT NULL DEFAULT 0,
    source_license_id TEXT,
    custom_order      INTEGER NOT NULL DEFAULT 0,
    domains           TEXT NOT NULL DEFAULT '[]',
    app_ids           TEXT NOT NULL DEFAULT '[]',
    process_names     TEXT NOT NULL DEFAULT '[]',
    password_hash     TEXT,
    created_ms        BIGINT NOT NULL,
    updated_ms        BIGINT NOT NULL
);
CREATE INDEX handshake_codes_org ON handshake_codes (organization_id);

-- The items a code draws on; position is the custom usage order when set.
CREATE TABLE code_items (
    code_name TEXT NOT NULL REFERENCES handshake_codes (name) ON DELETE CASCADE,
    item_id   TEXT NOT NULL,
    position  INTEGER NOT NULL,
    PRIMARY KEY (code_name, item_id)
);

-- An organization's default code when the admin picked one; otherwise the
-- default code of its first imported license.
CREATE TABLE organization_defaults (
    organization_id TEXT PRIMARY KEY,
    code_name       TEXT NOT NULL
);

CREATE TABLE seats (
    item_id     TEXT NOT NULL,
    client_uuid TEXT NOT NULL,
    granted_ms  BIGINT NOT NULL,
    refreshed_ms BIGINT NOT NULL,
    expires_ms  BIGINT NOT NULL,
    PRIMARY KEY (item_id, client_uuid)
);
CREATE INDEX seats_expiry ON seats (expires_ms);

-- The last state of each file seen in the import directory (or uploaded).
CREATE TABLE import_files (
    path       TEXT PRIMARY KEY,
    sha256     TEXT NOT NULL,
    state      TEXT NOT NULL,
    reason     TEXT,
    license_id TEXT,
    revision   INTEGER,
    seen_ms    BIGINT NOT NULL
);

-- Append-only: everything that changes or explains usage, with the code and
-- item as they were at that moment.
CREATE TABLE events (
    seq             INTEGER PRIMARY KEY,
    at_ms           BIGINT NOT NULL,
    type            TEXT NOT NULL,
    code            TEXT,
    item_id         TEXT,
    client_uuid     TEXT,
    product         TEXT,
    deployment_type TEXT,
    result          INTEGER,
    detail          TEXT
);
CREATE INDEX events_at ON events (at_ms);
