-- keyward schema v8: the broker outbox (issue 8, broker ACL provisioning).
-- A device's broker update (grant its group's topics, or revoke them) is
-- queued in the same transaction as the change that calls for it (issuance,
-- revocation, suspension, resumption), so it is never lost and survives a
-- restart; the drainer applies it and deletes the row, or records the
-- failure and backs off. One row per device: a later op replaces a pending
-- one (the newest decision is the one the broker must end up with).
CREATE TABLE broker_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id       TEXT NOT NULL UNIQUE REFERENCES devices(id),
    op              TEXT NOT NULL CHECK (op IN ('grant', 'revoke')),
    -- JSON array of {topic, access} for `grant`; NULL for `revoke`.
    rules           TEXT,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    CHECK ((op = 'grant') = (rules IS NOT NULL))
);
CREATE INDEX broker_outbox_due ON broker_outbox (next_attempt_at, id);
