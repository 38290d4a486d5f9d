-- Trust from the vendor's key to the device, and counts the vendor can check (issue 20).

-- The identity key a license file binds (base64 raw Ed25519), and the vendor's binding statement of
-- each revision that has one: an authorization carries the statement of the latest revision that
-- lists its item (a renewal keeps items it no longer lists, with their binding).
ALTER TABLE licenses ADD COLUMN server_key TEXT;
CREATE TABLE license_bindings (
    license_id TEXT NOT NULL,
    revision   INTEGER NOT NULL,
    key_id     TEXT NOT NULL,
    statement  TEXT NOT NULL,
    signature  TEXT NOT NULL,
    item_ids   TEXT NOT NULL,
    PRIMARY KEY (license_id, revision)
);

-- Authorizations on an item granted before since_ms have ended: a renewal replaced the item's license
-- (their usage reports are refused; the device's next handshake decides afresh). One row per item,
-- however many devices hold an authorization.
CREATE TABLE authorization_cutoffs (
    item_id  TEXT PRIMARY KEY,
    since_ms BIGINT NOT NULL
);

-- The usage chain (lts_server/usagechain.py): every event commits to its predecessor in its writer's
-- chain; one chain per writer (SQLite: one; PostgreSQL: one per node process), its head updated in
-- the same transaction as its events. Events written before this migration belong to no chain.
ALTER TABLE events ADD COLUMN chain INTEGER;
ALTER TABLE events ADD COLUMN chain_seq BIGINT;
ALTER TABLE events ADD COLUMN hash BLOB;
CREATE TABLE usage_chains (
    chain      INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    seq        BIGINT NOT NULL,
    head       BLOB NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

-- Usage statements exported so far: the next one starts at the last one's heads (a JSON object
-- chain -> [chainSeq, base64 hash, event seq]). summary and signature are what the statement's
-- last line holds, kept so that a lost file can be written again.
CREATE TABLE usage_statements (
    id         INTEGER PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    since_ms   BIGINT,
    until_ms   BIGINT NOT NULL,
    previous   INTEGER,
    start_heads TEXT NOT NULL,
    heads      TEXT NOT NULL,
    summary    TEXT NOT NULL,
    signature  TEXT NOT NULL,
    sha256     TEXT NOT NULL
);

-- Clone detection: the fingerprint (SHA-256 hex of what the device sent) a client UUID was first
-- granted with, and the last time another fingerprint asked for it.
CREATE TABLE device_bindings (
    client_uuid TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    bound_ms    BIGINT NOT NULL,
    clone_ms    BIGINT,
    clones      BIGINT NOT NULL DEFAULT 0
);

-- The server's clock against its records (lts_server/clock.py): the latest time recorded (every few
-- seconds), and the floor below which time-limited items are never judged (raised when the admin
-- accepts a clock set back). One row, id 1, written at the first tick.
CREATE TABLE clock_state (
    id          INTEGER PRIMARY KEY,
    latest_ms   BIGINT NOT NULL,
    floor_ms    BIGINT NOT NULL,
    accepted_ms BIGINT
);

-- A chain's events in order: a statement reads each chain's segment, and the archiver keeps what no
-- statement has covered yet.
CREATE INDEX events_chain ON events (chain, chain_seq);
