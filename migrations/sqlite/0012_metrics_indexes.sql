-- keyward schema v12: indexes for the metrics gauges (docs/metrics.md), read by every
-- daemon every jobs.metrics_refresh_interval_seconds. Both are partial (only the rows
-- the gauges count) and covering (they hold every column the query names, so SQLite
-- answers from the index and never reads a table row; tests/store_sqlite.rs checks
-- the query plans).
--
-- keyward_registrations_pending and the age of the oldest: COUNT and MIN(submitted_at)
-- over the pending registrations only.
CREATE INDEX registrations_pending_submitted ON registrations(status, submitted_at)
    WHERE status = 'pending';
-- keyward_certificates_by_expiry: one range count per bound over the active device
-- certificates only. Without it the count walks certificates_not_after and reads every
-- unexpired certificate row (DER included; superseded and revoked ones too) to check
-- its status and device.
CREATE INDEX certificates_active_device_not_after ON certificates(not_after, status, device_id)
    WHERE status = 'valid' AND device_id IS NOT NULL;
