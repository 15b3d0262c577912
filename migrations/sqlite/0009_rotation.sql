-- keyward schema v9: scheduled rotation (issue 9).
--
-- One row per rotation of one key (an issuing CA's key, an OCSP signer, the
-- TLS server key). The executor moves it through its steps, one commit per
-- step with that step's audit event, so a crash resumes at the last
-- committed step. At most one rotation per (purpose, target) is running
-- (any step before `retired`); a retired one waits, without blocking the
-- next rotation, until its old key may be destroyed (`destroy_after`).
CREATE TABLE rotations (
    id              TEXT PRIMARY KEY,
    purpose         TEXT NOT NULL,
    target          TEXT NOT NULL,
    step            TEXT NOT NULL,
    old_key_id      TEXT REFERENCES keys(id),
    new_key_id      TEXT REFERENCES keys(id),
    -- The new key's certificate (upper-case hex serial), once certified.
    new_serial      TEXT,
    reason          TEXT NOT NULL,
    actor           TEXT NOT NULL,
    -- The old key may be destroyed once this time has passed (the last
    -- certificate it issued has expired).
    destroy_after   INTEGER,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    finished_at     INTEGER
);
CREATE UNIQUE INDEX rotations_one_running ON rotations (purpose, target)
    WHERE step IN ('planned', 'key-generated', 'certified', 'published', 'activated');
CREATE INDEX rotations_open ON rotations (finished_at, next_attempt_at);

-- Each key of a CA signs the CRL of the certificates it issued: after a
-- rotation the retired key keeps publishing for its own certificates. The
-- cRLNumber sequence stays one per CA, shared by its keys.
ALTER TABLE crls ADD COLUMN issuer_key_id TEXT;
UPDATE crls SET issuer_key_id = (SELECT key_id FROM cas WHERE cas.name = crls.issuer_ca);
CREATE INDEX crls_by_key ON crls (issuer_key_id, number);
-- A key's CRL lists the revoked certificates it signed; a retired key's
-- destruction waits for the last certificate it signed.
CREATE INDEX certificates_issuer_key_status ON certificates (issuer_key_id, status, not_after);

-- The scheduler lease: with several daemons on one store, the holder of
-- the `scheduler` lease runs the jobs ([`LeaderLock`]).
CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    acquired_at INTEGER NOT NULL
);

-- When a `device.renewal_due` notification went out for a certificate
-- (once per certificate).
ALTER TABLE certificates ADD COLUMN renewal_notified_at INTEGER;
CREATE INDEX certificates_not_after ON certificates (not_after);
