-- keyward schema v13: device listing at fleet scale (issue 12). `GET /v1/admin/devices`
-- filters by status and/or group and pages by id (keyset). Without these, a filter
-- walks the primary key in id order and reads every device row to test it: with
-- 1,000,000 devices a page of a rare status (suspended, revoked) or a small group
-- read the whole table. With them each page is one index range scan. The names
-- match migrations/postgres (0012 created them there; its 0013 repeats them with
-- IF NOT EXISTS so that both stores list the same indexes at the same version).
CREATE INDEX IF NOT EXISTS devices_status_id ON devices(status, id);
CREATE INDEX IF NOT EXISTS devices_group_id ON devices(group_name, id);
-- Both filters at once: without this, a group and a status that rarely meet (or
-- never do) walk every device of the group (or of the status) to find the few: with
-- 1,000,000 devices a page that matches nothing took ~50 ms in SQLite and 200 ms
-- through the API (BENCHMARKS.md "Issue 12: 1,000,000 devices").
CREATE INDEX IF NOT EXISTS devices_group_status_id ON devices(group_name, status, id);
