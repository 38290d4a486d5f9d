-- Nodes of a PostgreSQL cluster commit in parallel, without a cluster-wide
-- lock (issue 24; docs/design.md, "A PostgreSQL cluster"). Lines starting with
-- "--pg " are run by PostgreSQL only (store/postgres.py `dialect`); to SQLite
-- they are comments.

-- The transaction that wrote an event (PostgreSQL: its xid8, pg_current_xact_id(),
-- as a number; SQLite, whose one writer commits in sequence order: 0) and the
-- node that wrote it (PostgreSQL: the writer connection's lts.node setting, a
-- number from cluster_nodes_node; SQLite: NULL). Readers of the log take events
-- in (tx, seq) order and only below the horizon of transactions still in
-- flight, so each event is read exactly once although sequence numbers no
-- longer commit in order. Events written before this migration keep tx 0.
ALTER TABLE events ADD COLUMN tx BIGINT NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN node BIGINT;
--pg ALTER TABLE events ALTER COLUMN tx SET DEFAULT (pg_current_xact_id()::text::bigint);
--pg ALTER TABLE events ALTER COLUMN node SET DEFAULT (NULLIF(current_setting('lts.node', true), '')::bigint);
--pg CREATE INDEX events_tx ON events (tx, seq);
--pg CREATE SEQUENCE cluster_nodes_node;

-- How far the rollup job has read the log: the position (last_tx, last_seq).
ALTER TABLE rollup_state ADD COLUMN last_tx BIGINT NOT NULL DEFAULT 0;

-- An archive file holds only events at or before the rollups' position when it
-- was written: (tx, seq) <= (folded_tx, folded_seq). Files written before this
-- migration had no such bound.
ALTER TABLE event_archives ADD COLUMN folded_tx BIGINT NOT NULL DEFAULT 9223372036854775807;
ALTER TABLE event_archives ADD COLUMN folded_seq BIGINT NOT NULL DEFAULT 9223372036854775807;

-- The live nodes of a cluster, each process of each machine one row while it
-- runs; a node renews expires_ms (database time, epoch ms) every
-- cluster.lease_ms / 4, and a node whose row expired is dead: its leased
-- seats go back to their items (lts_server/leases.py). Empty on SQLite.
CREATE TABLE cluster_nodes (
    node       BIGINT PRIMARY KEY,
    started_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    host       TEXT NOT NULL,
    pid        INTEGER NOT NULL
);

-- Seats a node took from an item's pool in one block and grants from in
-- memory. items.seats_used counts them as taken: seats_used = the item's seats
-- + every node's leased seats, so the seats held are seats_used minus the sum
-- here (store/sql.py STATUS_COLUMNS). Empty on SQLite.
CREATE TABLE seat_leases (
    item_id TEXT NOT NULL,
    node    BIGINT NOT NULL,
    seats   INTEGER NOT NULL,
    PRIMARY KEY (item_id, node)
);
