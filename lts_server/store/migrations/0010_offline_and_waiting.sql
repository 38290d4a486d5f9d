-- Offline and waiting (issue 25): borrowing, seat reservations and caps per code, client version
-- ranges, and the cluster-wide seat queue.

-- The vendor's terms of an item: how many days a device may borrow it offline (NULL: no borrowing)
-- and the client versions it serves (a PEP 440 range such as ">=3.0,<5"; NULL: any version).
ALTER TABLE items ADD COLUMN borrow_max_days INTEGER;
ALTER TABLE items ADD COLUMN versions TEXT;
-- The seats other codes must leave free: the sum over the item's codes of their unused reserved
-- seats, kept with every claim and release, so that a claim checks one row (store/sql.py).
ALTER TABLE items ADD COLUMN seats_reserved_unused INTEGER NOT NULL DEFAULT 0;

-- A code may lower its items' borrowing limit (NULL: the items' own; 0: no borrowing through it).
ALTER TABLE handshake_codes ADD COLUMN borrow_max_days INTEGER;

-- The code that took the seat (its reservation and cap count it; NULL for seats taken before this
-- version), and until when a borrowed seat is held for a device that is offline.
ALTER TABLE seats ADD COLUMN code TEXT;
ALTER TABLE seats ADD COLUMN borrowed_until_ms BIGINT;
CREATE INDEX seats_borrowed ON seats (item_id, borrowed_until_ms) WHERE borrowed_until_ms IS NOT NULL;

-- Per code and item: the seats reserved for the code, the most it may hold, and how many it holds.
CREATE TABLE code_item_limits (
    code_name      TEXT NOT NULL,
    item_id        TEXT NOT NULL,
    reserved_seats INTEGER NOT NULL DEFAULT 0,
    max_seats      INTEGER,
    seats_used     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (code_name, item_id)
) WITHOUT ROWID;
CREATE INDEX code_item_limits_item ON code_item_limits (item_id);

-- Borrowed intervals the statistics have yet to count: the rollup job marks a borrowed device active
-- in each 3-minute slice its borrow covers, as the slice begins (counted_ms), and drops the interval
-- once it is counted to its end (until_ms, moved earlier by a return or a release).
CREATE TABLE borrow_slices (
    item_id     TEXT NOT NULL,
    client_uuid TEXT NOT NULL,
    started_ms  BIGINT NOT NULL,
    code        TEXT,
    until_ms    BIGINT NOT NULL,
    counted_ms  BIGINT NOT NULL,
    PRIMARY KEY (item_id, client_uuid, started_ms)
) WITHOUT ROWID;
CREATE INDEX borrow_slices_counted ON borrow_slices (counted_ms);

-- Requests waiting for a seat on a PostgreSQL cluster, one row each, so that every node knows the
-- cluster-wide order (seq, the ticket) and the other nodes' waiters; nodes tell each other of changes
-- with NOTIFY (lts_server/store/pg_queue.py). Unused on SQLite, where one process holds the queue.
CREATE TABLE seat_queue (
    seq        INTEGER PRIMARY KEY,
    node       TEXT NOT NULL,
    code       TEXT NOT NULL,
    items      TEXT NOT NULL,
    expires_ms BIGINT NOT NULL
);
