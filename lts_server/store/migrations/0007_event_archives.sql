-- Archives of the event log (lts_server/archive.py). A row names a compressed
-- NDJSON file on the disk of the node that wrote it; the file holds every
-- event of an archived type (handshake, seat.*, usage.*) with
-- first_seq <= seq <= last_seq and at_ms < before_ms. The row is written once
-- the file is durable and before any of those events is deleted, and done_ms
-- once they all are: a run interrupted in between is finished by the next.
-- Ids are given by the store (one more than the largest).
CREATE TABLE event_archives (
    id         INTEGER PRIMARY KEY,
    path       TEXT NOT NULL,
    first_seq  BIGINT NOT NULL,
    last_seq   BIGINT NOT NULL,
    before_ms  BIGINT NOT NULL,
    events     BIGINT NOT NULL,
    bytes      BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    done_ms    BIGINT
);
