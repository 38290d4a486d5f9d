-- The admin account and its session tokens (stored as SHA-256 hashes only).

CREATE TABLE admin (
    id            INTEGER PRIMARY KEY,
    password_hash TEXT NOT NULL,
    changed_ms    BIGINT NOT NULL
);

CREATE TABLE admin_tokens (
    token_hash TEXT PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX admin_tokens_expiry ON admin_tokens (expires_ms);
