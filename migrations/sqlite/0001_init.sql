-- keyward schema v1 (SQLite). Times are Unix seconds; audit times are ms.
CREATE TABLE keys (
    id          TEXT PRIMARY KEY,
    label       TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    algorithm   TEXT NOT NULL,
    backend     TEXT NOT NULL,
    handle      TEXT NOT NULL,
    public_key  BLOB NOT NULL,
    state       TEXT NOT NULL,
    ca_name     TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE cas (
    name        TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    parent      TEXT REFERENCES cas(name),
    key_id      TEXT NOT NULL REFERENCES keys(id),
    certificate BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE admins (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    token_hash  BLOB NOT NULL UNIQUE,
    disabled    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);

CREATE TABLE registrations (
    id                      TEXT PRIMARY KEY,
    device_id               TEXT NOT NULL UNIQUE,
    group_name              TEXT NOT NULL,
    status                  TEXT NOT NULL,
    name                    TEXT NOT NULL,
    device_type             TEXT,
    location                TEXT,
    firmware                TEXT,
    csr                     BLOB NOT NULL,
    key_algorithm           TEXT NOT NULL,
    secret_hash             BLOB NOT NULL,
    submitted_by            TEXT REFERENCES admins(id),
    submitted_at            INTEGER NOT NULL,
    expires_at              INTEGER NOT NULL,
    decided_at              INTEGER,
    certificate_serial      TEXT,
    credentials_fetched_at  INTEGER
);
CREATE INDEX registrations_status ON registrations(status, submitted_at);

CREATE TABLE approvals (
    registration_id TEXT NOT NULL REFERENCES registrations(id),
    admin_id        TEXT NOT NULL REFERENCES admins(id),
    decision        TEXT NOT NULL,
    comment         TEXT,
    decided_at      INTEGER NOT NULL,
    PRIMARY KEY (registration_id, admin_id)
);

CREATE TABLE devices (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    device_type TEXT,
    location    TEXT,
    firmware    TEXT,
    group_name  TEXT NOT NULL,
    status      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE certificates (
    serial            TEXT PRIMARY KEY,
    device_id         TEXT REFERENCES devices(id),
    issuer_ca         TEXT NOT NULL,
    issuer_key_id     TEXT NOT NULL REFERENCES keys(id),
    subject           TEXT NOT NULL,
    not_before        INTEGER NOT NULL,
    not_after         INTEGER NOT NULL,
    fingerprint       TEXT NOT NULL,
    der               BLOB NOT NULL,
    status            TEXT NOT NULL,
    revoked_at        INTEGER,
    revocation_reason TEXT,
    created_at        INTEGER NOT NULL
);
CREATE INDEX certificates_device ON certificates(device_id);

CREATE TABLE audit_events (
    seq       INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    details   TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash      BLOB NOT NULL,
    version   INTEGER NOT NULL
);

-- Accidental edits are refused here; deliberate ones are caught by the hash chain.
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END;
