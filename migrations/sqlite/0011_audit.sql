-- keyward schema v11: audit trail v2.
-- Signed checkpoints of the chain head. Not audit events themselves (a
-- checkpoint event would move the head it signs): each row authenticates
-- itself by its signature, made in the HSM by the `audit` key.
CREATE TABLE audit_checkpoints (
    seq        INTEGER PRIMARY KEY,   -- the last event the checkpoint covers
    hash       BLOB NOT NULL,         -- that event's chain hash
    at_ms      INTEGER NOT NULL,      -- when the checkpoint was signed
    key_id     TEXT NOT NULL,         -- the audit key (keys.id) that signed it
    signature  BLOB NOT NULL          -- over audit::checkpoint::Checkpoint::message()
);
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;

-- Data keys that encrypt the sensitive details of audit events (record
-- version 3, column `sealed`), each wrapped by an HSM key.
CREATE TABLE audit_data_keys (
    id          TEXT PRIMARY KEY,     -- UUIDv7, named in each sealed value
    key_id      TEXT NOT NULL,        -- keys.id of the HSM key that unwraps it
    wrapped     BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);

-- Ciphertext of an event's sensitive details (record version 3), covered by
-- the chain hash: verification never needs the plaintext.
ALTER TABLE audit_events ADD COLUMN sealed TEXT;

-- Audit reports filter by time (GET /v1/admin/audit?since=&until=). The only
-- index on audit_events besides the sequence: each one slows the append path.
CREATE INDEX audit_events_at_ms ON audit_events(at_ms);

-- Losing a data key loses the sealed details it encrypted: append-only too.
CREATE TRIGGER audit_data_keys_no_update BEFORE UPDATE ON audit_data_keys
BEGIN SELECT RAISE(ABORT, 'audit data keys are append-only'); END;
CREATE TRIGGER audit_data_keys_no_delete BEFORE DELETE ON audit_data_keys
BEGIN SELECT RAISE(ABORT, 'audit data keys are append-only'); END;
