-- Rollups in a bounded shape (issue 23): one row of device marks per device and day instead of one per
-- device, bucket and scope (rollup_devices: 8 rows for a new device, ~74 a day for a device active hourly).
-- The formats of the marks columns are in lts_server/core/marks.py. BLOB is BYTEA on PostgreSQL.

-- Codes and items by number, inside the marks.
CREATE TABLE rollup_keys (
    id    INTEGER PRIMARY KEY,
    scope TEXT NOT NULL,
    key   TEXT NOT NULL,
    UNIQUE (scope, key)
);

-- Per device, for good: its number in rollup_days, and the codes and items it was ever active on (with
-- the months it was last active in), so it counts once in the all-time and monthly buckets.
CREATE TABLE rollup_clients (
    client_uuid TEXT PRIMARY KEY,
    id          BIGINT NOT NULL,
    marks       BLOB NOT NULL
) WITHOUT ROWID;

-- Per device and UTC day (days since 1970), while a late usage record can reach the day (31 days): the
-- hours and 3-minute slices it was active in, per code and item.
CREATE TABLE rollup_days (
    day    INTEGER NOT NULL,
    client BIGINT NOT NULL,
    marks  BLOB NOT NULL,
    PRIMARY KEY (day, client)
) WITHOUT ROWID;

-- next_client: the next device number. monthly_from_ms: month buckets before it count no devices (the
-- release before kept no month marks). conversion: 1 or 2 while the marks of that release (rollup_devices)
-- are being converted (store/sql.py convert_marks); 0 once done. The rollup job folds no event until then.
ALTER TABLE rollup_state ADD COLUMN next_client BIGINT NOT NULL DEFAULT 1;
ALTER TABLE rollup_state ADD COLUMN monthly_from_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rollup_state ADD COLUMN conversion INTEGER NOT NULL DEFAULT 0;
UPDATE rollup_state SET conversion = 1 WHERE EXISTS (SELECT 1 FROM rollups) OR EXISTS (SELECT 1 FROM rollup_devices);
