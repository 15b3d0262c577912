-- keyward schema v10: encrypted backups and their replicas.
-- One row per archive made; `pruned_at` once retention removed it everywhere.
CREATE TABLE backups (
    id              TEXT PRIMARY KEY,          -- UUIDv7
    file_name       TEXT NOT NULL UNIQUE,      -- keyward-<time>-<id>.age
    created_at      INTEGER NOT NULL,
    sha256          TEXT NOT NULL,             -- hex SHA-256 of the encrypted file
    size_bytes      INTEGER NOT NULL,
    format_version  INTEGER NOT NULL,
    schema_version  INTEGER NOT NULL,
    trigger         TEXT NOT NULL,             -- manual | scheduled
    actor           TEXT NOT NULL,
    summary         TEXT NOT NULL,             -- JSON: row counts, keys wrapped / bound to hardware
    pruned_at       INTEGER
);
CREATE INDEX backups_created ON backups(created_at);

-- Where each archive is (meant to be) stored.
CREATE TABLE backup_replicas (
    backup_id        TEXT NOT NULL REFERENCES backups(id),
    location         TEXT NOT NULL,
    state            TEXT NOT NULL,            -- pending | stored | failed | pruned
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    next_attempt_at  INTEGER NOT NULL,
    stored_at        INTEGER,
    verified_at      INTEGER,                  -- last successful verification
    verify_error     TEXT,                     -- last verification's failure, cleared by a success
    updated_at       INTEGER NOT NULL,
    PRIMARY KEY (backup_id, location)
);
CREATE INDEX backup_replicas_due ON backup_replicas(state, next_attempt_at);
