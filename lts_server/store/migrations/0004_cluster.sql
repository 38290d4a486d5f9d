-- One identity for a cluster of nodes on one PostgreSQL database: every node
-- presents the same server UUID (license files are bound to it) and signs
-- with the same key. A single SQLite node keeps its identity in files in its
-- state folder instead, and this table stays empty there.
CREATE TABLE cluster_identity (
    id              INTEGER PRIMARY KEY,
    server_uuid     TEXT NOT NULL,
    signing_key_pem TEXT NOT NULL,
    secret_hex      TEXT NOT NULL
);
