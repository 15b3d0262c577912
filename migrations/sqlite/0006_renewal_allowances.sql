-- keyward schema v6: one-time early-renewal allowances (issue 7).
-- An admin may let a device renew before its profile's renewal window
-- opens (`POST /v1/admin/devices/{id}/allow-renewal`). At most one open
-- allowance per device: a new grant replaces the previous one; the renewal
-- that uses it deletes it in its own transaction. The audit trail keeps the
-- history (`device.allow_renewal`, `certificate.renew` with `forced`).
CREATE TABLE renewal_allowances (
    device_id   TEXT PRIMARY KEY REFERENCES devices(id),
    granted_by  TEXT NOT NULL REFERENCES admins(id),
    granted_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
