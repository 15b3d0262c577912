-- keyward schema v3: client addresses on registrations and audit events,
-- credential re-fetch until confirmed, admin disable time, admin requests
-- (invitations and role changes that a second admin approves), and indexes
-- for keyset pagination (ids are UUIDv7: id order is creation order).
ALTER TABLE registrations ADD COLUMN client_addr TEXT;
ALTER TABLE registrations ADD COLUMN credentials_confirmed_at INTEGER;
ALTER TABLE admins ADD COLUMN disabled_at INTEGER;
ALTER TABLE audit_events ADD COLUMN source TEXT;

DROP INDEX registrations_status;
CREATE INDEX registrations_status_id ON registrations(status, id);
CREATE INDEX registrations_group_status ON registrations(group_name, status);
CREATE INDEX registrations_pending_expiry ON registrations(expires_at) WHERE status = 'pending';

CREATE TABLE admin_requests (
    id                    TEXT PRIMARY KEY,
    kind                  TEXT NOT NULL,
    name                  TEXT NOT NULL,
    admin_id              TEXT REFERENCES admins(id),
    role                  TEXT NOT NULL,
    requested_by          TEXT NOT NULL REFERENCES admins(id),
    status                TEXT NOT NULL,
    decided_by            TEXT REFERENCES admins(id),
    requester_secret_hash BLOB,
    approver_secret_hash  BLOB,
    client_addr           TEXT,
    created_at            INTEGER NOT NULL,
    expires_at            INTEGER NOT NULL,
    decided_at            INTEGER,
    redeemed_at           INTEGER
);
CREATE INDEX admin_requests_status_id ON admin_requests(status, id);
-- One open request per invitee name / per target admin.
CREATE UNIQUE INDEX admin_requests_open_invite ON admin_requests(name)
    WHERE kind = 'invite' AND status IN ('pending', 'approved');
CREATE UNIQUE INDEX admin_requests_open_set_role ON admin_requests(admin_id)
    WHERE kind = 'set-role' AND status = 'pending';
