-- keyward schema v12 for PostgreSQL, in one file.
--
-- The schema version is one number across backends: this file creates on an
-- empty PostgreSQL database what SQLite reaches through migrations 0001..0012
-- (migrations/sqlite), so a snapshot (backup, `keyward migrate`) of version N
-- means the same tables and columns on both. Later versions add one file here
-- and one in migrations/sqlite.
--
-- Types: UUIDs and names TEXT (UUIDv7 text order is creation order, as in
-- SQLite); times BIGINT Unix seconds (audit and lease times ms); flags
-- BOOLEAN; binary BYTEA.

-- Refuses UPDATE, DELETE (row triggers) and TRUNCATE (statement trigger) on
-- append-only tables. Accidental edits stop here; deliberate ones are caught
-- by the hash chain and the signed checkpoints.
CREATE FUNCTION keyward_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% are append-only', TG_ARGV[0] USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TABLE keys (
    id          TEXT PRIMARY KEY,
    label       TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    algorithm   TEXT NOT NULL,
    backend     TEXT NOT NULL,
    handle      TEXT NOT NULL,
    public_key  BYTEA NOT NULL,
    state       TEXT NOT NULL,
    ca_name     TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    keystore    TEXT NOT NULL DEFAULT 'default'
);

CREATE TABLE cas (
    name        TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    parent      TEXT REFERENCES cas(name),
    key_id      TEXT NOT NULL REFERENCES keys(id),
    certificate BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE admins (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    token_hash  BYTEA NOT NULL UNIQUE,
    disabled    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  BIGINT NOT NULL,
    disabled_at BIGINT,
    -- Accounts that have ever held role `admin` (see sqlite 0004).
    ever_admin  BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE registrations (
    id                       TEXT PRIMARY KEY,
    device_id                TEXT NOT NULL,
    group_name               TEXT NOT NULL,
    status                   TEXT NOT NULL,
    name                     TEXT NOT NULL,
    device_type              TEXT,
    location                 TEXT,
    firmware                 TEXT,
    -- Empty for a server-generated key (no CSR).
    csr                      BYTEA NOT NULL,
    key_algorithm            TEXT NOT NULL,
    secret_hash              BYTEA NOT NULL,
    submitted_by             TEXT REFERENCES admins(id),
    submitted_at             BIGINT NOT NULL,
    expires_at               BIGINT NOT NULL,
    decided_at               BIGINT,
    certificate_serial       TEXT,
    credentials_fetched_at   BIGINT,
    client_addr              TEXT,
    credentials_confirmed_at BIGINT,
    attestation              TEXT NOT NULL DEFAULT 'none',
    attested_identity        TEXT,
    attestation_details      TEXT,
    enrollment_token_id      TEXT,
    token_minted_by          TEXT,
    reenrollment             BOOLEAN NOT NULL DEFAULT FALSE,
    key_source               TEXT NOT NULL DEFAULT 'csr',
    age_recipient            TEXT,
    server_key_id            TEXT,
    key_delivered_at         BIGINT
);
CREATE INDEX registrations_status_id ON registrations(status, id);
CREATE INDEX registrations_group_status ON registrations(group_name, status);
CREATE INDEX registrations_pending_expiry ON registrations(expires_at) WHERE status = 'pending';
CREATE INDEX registrations_device ON registrations(device_id);
CREATE INDEX registrations_pending_submitted ON registrations(status, submitted_at)
    WHERE status = 'pending';

CREATE TABLE approvals (
    registration_id TEXT NOT NULL REFERENCES registrations(id),
    admin_id        TEXT NOT NULL REFERENCES admins(id),
    decision        TEXT NOT NULL,
    comment         TEXT,
    decided_at      BIGINT NOT NULL,
    PRIMARY KEY (registration_id, admin_id)
);

CREATE TABLE admin_requests (
    id                    TEXT PRIMARY KEY,
    kind                  TEXT NOT NULL,
    name                  TEXT NOT NULL,
    admin_id              TEXT REFERENCES admins(id),
    role                  TEXT NOT NULL,
    requested_by          TEXT NOT NULL REFERENCES admins(id),
    status                TEXT NOT NULL,
    decided_by            TEXT REFERENCES admins(id),
    requester_secret_hash BYTEA,
    approver_secret_hash  BYTEA,
    client_addr           TEXT,
    created_at            BIGINT NOT NULL,
    expires_at            BIGINT NOT NULL,
    decided_at            BIGINT,
    redeemed_at           BIGINT
);
CREATE INDEX admin_requests_status_id ON admin_requests(status, id);
CREATE UNIQUE INDEX admin_requests_open_invite ON admin_requests(name)
    WHERE kind = 'invite' AND status IN ('pending', 'approved');
CREATE UNIQUE INDEX admin_requests_open_set_role ON admin_requests(admin_id)
    WHERE kind = 'set-role' AND status = 'pending';

CREATE TABLE devices (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    device_type TEXT,
    location    TEXT,
    firmware    TEXT,
    group_name  TEXT NOT NULL,
    status      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
-- Device listing filtered by status or group, keyset by id (1M devices:
-- each page is one index range scan).
CREATE INDEX devices_status_id ON devices(status, id);
CREATE INDEX devices_group_id ON devices(group_name, id);

CREATE TABLE certificates (
    serial              TEXT PRIMARY KEY,
    device_id           TEXT REFERENCES devices(id),
    issuer_ca           TEXT NOT NULL,
    issuer_key_id       TEXT NOT NULL REFERENCES keys(id),
    subject             TEXT NOT NULL,
    not_before          BIGINT NOT NULL,
    not_after           BIGINT NOT NULL,
    fingerprint         TEXT NOT NULL,
    der                 BYTEA NOT NULL,
    status              TEXT NOT NULL,
    revoked_at          BIGINT,
    revocation_reason   TEXT,
    created_at          BIGINT NOT NULL,
    superseded_by       TEXT,
    spki_sha256         TEXT,
    renewal_notified_at BIGINT
);
CREATE INDEX certificates_device ON certificates(device_id);
CREATE INDEX certificates_spki ON certificates(spki_sha256);
CREATE INDEX certificates_issuer_status ON certificates(issuer_ca, status);
CREATE INDEX certificates_issuer_key_status ON certificates(issuer_key_id, status, not_after);
CREATE INDEX certificates_not_after ON certificates(not_after);
CREATE INDEX certificates_active_device_not_after ON certificates(not_after, status, device_id)
    WHERE status = 'valid' AND device_id IS NOT NULL;

CREATE TABLE crls (
    issuer_ca     TEXT NOT NULL,
    number        BIGINT NOT NULL,
    this_update   BIGINT NOT NULL,
    next_update   BIGINT NOT NULL,
    entries       BIGINT NOT NULL,
    der           BYTEA NOT NULL,
    created_at    BIGINT NOT NULL,
    issuer_key_id TEXT,
    PRIMARY KEY (issuer_ca, number)
);
CREATE INDEX crls_by_key ON crls(issuer_key_id, number);

CREATE TABLE service_certificates (
    serial      TEXT PRIMARY KEY REFERENCES certificates(serial),
    purpose     TEXT NOT NULL,
    issuer_ca   TEXT NOT NULL,
    key_id      TEXT NOT NULL REFERENCES keys(id),
    not_after   BIGINT NOT NULL,
    retired_at  BIGINT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX service_certificates_purpose ON service_certificates(purpose, issuer_ca);

CREATE TABLE renewal_allowances (
    device_id   TEXT PRIMARY KEY REFERENCES devices(id),
    granted_by  TEXT NOT NULL REFERENCES admins(id),
    granted_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);

CREATE TABLE enrollment_tokens (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    token_hash    BYTEA NOT NULL UNIQUE,
    group_name    TEXT,
    device_id     TEXT,
    device_name   TEXT,
    uses_allowed  BIGINT NOT NULL,
    uses          BIGINT NOT NULL DEFAULT 0,
    created_by    TEXT NOT NULL REFERENCES admins(id),
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    revoked_at    BIGINT,
    revoked_by    TEXT REFERENCES admins(id),
    last_used_at  BIGINT
);

CREATE TABLE device_identities (
    identity         TEXT PRIMARY KEY,
    device_id        TEXT NOT NULL,
    method           TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    last_enrolled_at BIGINT NOT NULL
);
CREATE INDEX device_identities_device ON device_identities(device_id);

CREATE TABLE jwt_replay (
    issuer      TEXT NOT NULL,
    jti         TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    PRIMARY KEY (issuer, jti)
);
CREATE INDEX jwt_replay_expiry ON jwt_replay(expires_at);

CREATE TABLE broker_outbox (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    device_id       TEXT NOT NULL UNIQUE REFERENCES devices(id),
    op              TEXT NOT NULL CHECK (op IN ('grant', 'revoke')),
    rules           TEXT,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    CHECK ((op = 'grant') = (rules IS NOT NULL))
);
CREATE INDEX broker_outbox_due ON broker_outbox(next_attempt_at, id);

CREATE TABLE rotations (
    id              TEXT PRIMARY KEY,
    purpose         TEXT NOT NULL,
    target          TEXT NOT NULL,
    step            TEXT NOT NULL,
    old_key_id      TEXT REFERENCES keys(id),
    new_key_id      TEXT REFERENCES keys(id),
    new_serial      TEXT,
    reason          TEXT NOT NULL,
    actor           TEXT NOT NULL,
    destroy_after   BIGINT,
    attempts        BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    finished_at     BIGINT
);
CREATE UNIQUE INDEX rotations_one_running ON rotations(purpose, target)
    WHERE step IN ('planned', 'key-generated', 'certified', 'published', 'activated');
CREATE INDEX rotations_open ON rotations(finished_at, next_attempt_at);

CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    acquired_at BIGINT NOT NULL
);

CREATE TABLE backups (
    id              TEXT PRIMARY KEY,
    file_name       TEXT NOT NULL UNIQUE,
    created_at      BIGINT NOT NULL,
    sha256          TEXT NOT NULL,
    size_bytes      BIGINT NOT NULL,
    format_version  BIGINT NOT NULL,
    schema_version  BIGINT NOT NULL,
    trigger         TEXT NOT NULL,
    actor           TEXT NOT NULL,
    summary         TEXT NOT NULL,
    pruned_at       BIGINT
);
CREATE INDEX backups_created ON backups(created_at);

CREATE TABLE backup_replicas (
    backup_id        TEXT NOT NULL REFERENCES backups(id),
    location         TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    last_error       TEXT,
    next_attempt_at  BIGINT NOT NULL,
    stored_at        BIGINT,
    verified_at      BIGINT,
    verify_error     TEXT,
    updated_at       BIGINT NOT NULL,
    PRIMARY KEY (backup_id, location)
);
CREATE INDEX backup_replicas_due ON backup_replicas(state, next_attempt_at);

-- The audit chain. One total order across every daemon sharing this
-- database: appends are serialised by a transaction-scoped advisory lock
-- (src/store/postgres/writer.rs), `seq` is assigned under it.
CREATE TABLE audit_events (
    seq       BIGINT PRIMARY KEY,
    at_ms     BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    details   TEXT NOT NULL,
    prev_hash BYTEA NOT NULL,
    hash      BYTEA NOT NULL,
    version   BIGINT NOT NULL,
    source    TEXT,
    sealed    TEXT
);
CREATE INDEX audit_events_at_ms ON audit_events(at_ms);
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION keyward_append_only('audit events');
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_append_only('audit events');

CREATE TABLE audit_checkpoints (
    seq        BIGINT PRIMARY KEY,
    hash       BYTEA NOT NULL,
    at_ms      BIGINT NOT NULL,
    key_id     TEXT NOT NULL,
    signature  BYTEA NOT NULL
);
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION keyward_append_only('audit checkpoints');
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_append_only('audit checkpoints');

CREATE TABLE audit_data_keys (
    id          TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL,
    wrapped     BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE TRIGGER audit_data_keys_append_only BEFORE UPDATE OR DELETE ON audit_data_keys
    FOR EACH ROW EXECUTE FUNCTION keyward_append_only('audit data keys');
CREATE TRIGGER audit_data_keys_no_truncate BEFORE TRUNCATE ON audit_data_keys
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_append_only('audit data keys');
