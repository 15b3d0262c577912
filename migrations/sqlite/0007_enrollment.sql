-- keyward schema v7: attested enrollment (issue 8).
--
-- Registrations may now re-enroll an existing device (a second enrollment
-- of the same manufacturer certificate or JWT claim, or a reclaim), so
-- device_id is no longer unique on registrations: the table is rebuilt
-- (SQLite cannot drop a column constraint). Foreign keys from approvals
-- are checked at commit, after the rename restores the table name.
PRAGMA defer_foreign_keys = ON;

CREATE TABLE registrations_v7 (
    id                      TEXT PRIMARY KEY,
    device_id               TEXT NOT NULL,
    group_name              TEXT NOT NULL,
    status                  TEXT NOT NULL,
    name                    TEXT NOT NULL,
    device_type             TEXT,
    location                TEXT,
    firmware                TEXT,
    -- Empty for a server-generated key (no CSR).
    csr                     BLOB NOT NULL,
    key_algorithm           TEXT NOT NULL,
    secret_hash             BLOB NOT NULL,
    submitted_by            TEXT REFERENCES admins(id),
    submitted_at            INTEGER NOT NULL,
    expires_at              INTEGER NOT NULL,
    decided_at              INTEGER,
    certificate_serial      TEXT,
    credentials_fetched_at  INTEGER,
    client_addr             TEXT,
    credentials_confirmed_at INTEGER,
    -- How the device proved who it is, and what it proved.
    attestation             TEXT NOT NULL DEFAULT 'none',
    attested_identity       TEXT,
    attestation_details     TEXT,
    -- The bootstrap token or reclaim code used, and the admin who minted it
    -- (who may not approve this registration).
    enrollment_token_id     TEXT,
    token_minted_by         TEXT,
    -- The device existed before: re-provisioning or reclaim.
    reenrollment            INTEGER NOT NULL DEFAULT 0,
    key_source              TEXT NOT NULL DEFAULT 'csr',
    -- Server keys: the age recipient the bundle is encrypted to (NULL:
    -- PKCS#12 with a one-time password), the HSM key, its delivery.
    age_recipient           TEXT,
    server_key_id           TEXT,
    key_delivered_at        INTEGER
);
INSERT INTO registrations_v7 (id, device_id, group_name, status, name, device_type, location, firmware, csr,
    key_algorithm, secret_hash, submitted_by, submitted_at, expires_at, decided_at, certificate_serial,
    credentials_fetched_at, client_addr, credentials_confirmed_at)
  SELECT id, device_id, group_name, status, name, device_type, location, firmware, csr,
    key_algorithm, secret_hash, submitted_by, submitted_at, expires_at, decided_at, certificate_serial,
    credentials_fetched_at, client_addr, credentials_confirmed_at FROM registrations;
DROP TABLE registrations;
ALTER TABLE registrations_v7 RENAME TO registrations;
CREATE INDEX registrations_status_id ON registrations(status, id);
CREATE INDEX registrations_group_status ON registrations(group_name, status);
CREATE INDEX registrations_pending_expiry ON registrations(expires_at) WHERE status = 'pending';
CREATE INDEX registrations_device ON registrations(device_id);

-- Bootstrap tokens (per group, N uses) and reclaim codes (one device, once).
-- Only an HMAC of the secret is stored.
CREATE TABLE enrollment_tokens (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    token_hash    BLOB NOT NULL UNIQUE,
    group_name    TEXT,
    device_id     TEXT,
    device_name   TEXT,
    uses_allowed  INTEGER NOT NULL,
    uses          INTEGER NOT NULL DEFAULT 0,
    created_by    TEXT NOT NULL REFERENCES admins(id),
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    revoked_at    INTEGER,
    revoked_by    TEXT REFERENCES admins(id),
    last_used_at  INTEGER
);
CREATE INDEX enrollment_tokens_created ON enrollment_tokens(id);

-- One attested identity (manufacturer certificate, JWT device claim) maps
-- to one device, for good.
CREATE TABLE device_identities (
    identity        TEXT PRIMARY KEY,
    device_id       TEXT NOT NULL,
    method          TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    last_enrolled_at INTEGER NOT NULL
);
CREATE INDEX device_identities_device ON device_identities(device_id);

-- JWT ids seen, kept until the token would have expired: a replay within a
-- token's life is refused.
CREATE TABLE jwt_replay (
    issuer      TEXT NOT NULL,
    jti         TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (issuer, jti)
);
CREATE INDEX jwt_replay_expiry ON jwt_replay(expires_at);
