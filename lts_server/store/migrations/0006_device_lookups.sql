-- A node of a PostgreSQL cluster re-reads the seats and authorizations of the
-- devices other nodes changed (store/sql.py `reload`: WHERE client_uuid IN ...)
-- every follow_ms and after a conflict. Neither primary key starts with
-- client_uuid, so without these indexes each re-read scanned both tables
-- whole: O(all seats) per node, five times a second (bench/handshake/run.py,
-- two nodes: 230,000 rows of each read to follow 3,439 grants).
CREATE INDEX seats_client ON seats (client_uuid);
CREATE INDEX authorizations_client ON authorizations (client_uuid);
