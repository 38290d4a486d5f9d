-- Server-side functions of the PostgreSQL store (store/pg_batch.py). Installed by every node at
-- start-up (CREATE OR REPLACE, under the migration lock); the version in each name changes
-- whenever a signature or a meaning does, so nodes of two versions can run side by side.

-- The seat, report, unit and usage-chain changes of one plain batch (pg_batch.plain), in the
-- ledger's order: the same statements, in the same order, as store/sql.py write_batch with
-- store/sql_leases.py, run by the database instead of one round trip each. Raises SQLSTATE
-- LT409 with the index of the job whose change the database refuses (DETAIL) when a claim finds
-- no room, a seat already exists or no longer does, or a report was already counted; LT412 when
-- the usage chain's head moved (another process on this chain: the caller writes the batch again
-- the general way, which reads the head again). Either undoes the whole statement.
--
-- s_block: per claim, NULL when it may not use a lease, else the seats to lease along with it
-- (0: none); s_held: this node may hold a lease of the claim's item. A lease's seat is granted only while
-- the item's row is within the claim's limit (store/sql_leases.py WITHIN_LIMIT).
--
-- v3: v2 granted a lease's seat whatever the item's row said, so a renewal with fewer seats could be
-- oversold by the seats leased before it.
CREATE OR REPLACE FUNCTION lts_write_v3(
    p_node bigint,
    s_op smallint[], s_item text[], s_client text[], s_granted bigint[], s_refreshed bigint[],
    s_expires bigint[], s_code text[], s_borrowed bigint[], s_limit integer[], s_job integer[],
    s_block integer[], s_held boolean[], s_excl text[],
    r_id text[], r_client text[], r_code text[], r_received bigint[], r_job integer[],
    u_item text[], u_units bigint[],
    c_chain bigint, c_old bigint, c_new bigint, c_hash bytea, c_now bigint
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    b integer;
    room boolean;
    held text;
BEGIN
    -- The rows of the items the batch changes through their row for sure (releases, claims without a
    -- lease, unit charges), locked first and in item order, as every node's batches lock them: two
    -- nodes' batches over many items then never wait for each other in a circle (a deadlock costs a
    -- second before PostgreSQL breaks it). Claims that may use a lease lock their lease row first.
    PERFORM 1 FROM items WHERE item_id IN (
        SELECT s_item[j] FROM generate_subscripts(s_op, 1) AS g (j)
        WHERE s_op[j] = 3 OR (s_op[j] = 1 AND (s_block[j] IS NULL OR (s_block[j] = 0 AND NOT s_held[j])))
        UNION SELECT unnest(u_item))
        ORDER BY item_id FOR UPDATE;
    FOR i IN 1 .. coalesce(array_length(s_op, 1), 0) LOOP
        IF s_op[i] = 1 THEN
            IF s_excl[i] IS NOT NULL THEN
                SELECT item_id INTO held FROM seats
                    WHERE client_uuid = s_client[i]
                      AND item_id IN (SELECT jsonb_array_elements_text(s_excl[i]::jsonb)) LIMIT 1;
                IF FOUND THEN
                    RAISE EXCEPTION USING ERRCODE = 'LT409', DETAIL = s_job[i]::text,
                        MESSAGE = format('device %s already holds a seat on item %s of the code', s_client[i], held);
                END IF;
            END IF;
            room := false;
            b := s_block[i];
            IF b IS NOT NULL AND (s_held[i] OR b > 0) THEN  -- this node's lease
                UPDATE seat_leases SET seats = seats - 1 WHERE item_id = s_item[i] AND node = p_node AND seats > 0
                    AND (SELECT seats_used FROM items WHERE item_id = s_item[i]) <= s_limit[i];
                room := FOUND;
            END IF;
            IF NOT room AND b > 0 THEN  -- a new block along with the claim; the lease row first
                INSERT INTO seat_leases (item_id, node, seats) VALUES (s_item[i], p_node, 0)
                    ON CONFLICT (item_id, node) DO UPDATE SET seats = seat_leases.seats;
                UPDATE items SET seats_used = seats_used + 1 + b
                    WHERE item_id = s_item[i] AND seats_used + seats_reserved_unused + 1 + b <= s_limit[i];
                IF FOUND THEN
                    UPDATE seat_leases SET seats = seats + b WHERE item_id = s_item[i] AND node = p_node;
                    room := true;
                END IF;
            END IF;
            IF NOT room THEN  -- the item's row; other codes' unused reserved seats stay free
                UPDATE items SET seats_used = seats_used + 1
                    WHERE item_id = s_item[i] AND seats_used + seats_reserved_unused < s_limit[i];
                room := FOUND;
            END IF;
            IF NOT room THEN  -- full, but for seats other nodes leased and have not granted
                UPDATE seat_leases SET seats = seats - 1 WHERE item_id = s_item[i] AND seats > 0 AND node =
                    (SELECT node FROM seat_leases WHERE item_id = s_item[i] AND seats > 0 ORDER BY seats DESC LIMIT 1)
                    AND (SELECT seats_used FROM items WHERE item_id = s_item[i]) <= s_limit[i];
                room := FOUND;
            END IF;
            IF NOT room THEN
                RAISE EXCEPTION USING ERRCODE = 'LT409', DETAIL = s_job[i]::text,
                    MESSAGE = format('item %s has no room for another seat (limit %s)', s_item[i], s_limit[i]);
            END IF;
            INSERT INTO seats (item_id, client_uuid, granted_ms, refreshed_ms, expires_ms, code, borrowed_until_ms)
                VALUES (s_item[i], s_client[i], s_granted[i], s_refreshed[i], s_expires[i], s_code[i], s_borrowed[i])
                ON CONFLICT (item_id, client_uuid) DO NOTHING;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'LT409', DETAIL = s_job[i]::text,
                    MESSAGE = format('device %s already holds a seat on item %s', s_client[i], s_item[i]);
            END IF;
        ELSIF s_op[i] = 2 THEN
            UPDATE seats SET refreshed_ms = s_refreshed[i], expires_ms = s_expires[i], borrowed_until_ms = s_borrowed[i]
                WHERE item_id = s_item[i] AND client_uuid = s_client[i];
            IF NOT FOUND THEN  -- released meanwhile by another node
                RAISE EXCEPTION USING ERRCODE = 'LT409', DETAIL = s_job[i]::text,
                    MESSAGE = format('device %s no longer holds a seat on item %s', s_client[i], s_item[i]);
            END IF;
        ELSE
            DELETE FROM seats WHERE item_id = s_item[i] AND client_uuid = s_client[i];
            IF NOT FOUND THEN  -- released meanwhile by another node: this release would count twice
                RAISE EXCEPTION USING ERRCODE = 'LT409', DETAIL = s_job[i]::text,
                    MESSAGE = format('device %s no longer holds a seat on item %s', s_client[i], s_item[i]);
            END IF;
            UPDATE items SET seats_used = seats_used - 1 WHERE item_id = s_item[i];
        END IF;
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(r_id, 1), 0) LOOP
        INSERT INTO usage_reports (report_id, client_uuid, code, received_ms)
            VALUES (r_id[i], r_client[i], r_code[i], r_received[i]) ON CONFLICT (report_id) DO NOTHING;
        IF NOT FOUND THEN  -- counted meanwhile by another node
            RAISE EXCEPTION USING ERRCODE = 'LT409', DETAIL = r_job[i]::text,
                MESSAGE = format('usage report %s was already counted', r_id[i]);
        END IF;
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(u_item, 1), 0) LOOP
        UPDATE items SET units_used = units_used + u_units[i] WHERE item_id = u_item[i];
    END LOOP;
    IF c_chain IS NOT NULL THEN
        UPDATE usage_chains SET seq = c_new, head = c_hash, updated_ms = c_now WHERE chain = c_chain AND seq = c_old;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'LT412', MESSAGE = format('usage chain %s moved under this writer', c_chain);
        END IF;
    END IF;
END
$$;
