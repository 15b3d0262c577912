-- keyward schema v13: device listing at fleet scale (issue 12). The PostgreSQL schema
-- v12 (0012_schema.sql) already has the two single-filter indexes (repeated here with
-- IF NOT EXISTS so that both stores list the same indexes at the same version, as in
-- migrations/sqlite/0013_device_indexes.sql); the combined one is new.
CREATE INDEX IF NOT EXISTS devices_status_id ON devices(status, id);
CREATE INDEX IF NOT EXISTS devices_group_id ON devices(group_name, id);
-- Both filters at once: without this, a group and a status that rarely meet (or
-- never do) walk every device of the group (or of the status) to find the few: with
-- 1,000,000 devices a page that matches nothing took ~50 ms in SQLite and 200 ms
-- through the API (BENCHMARKS.md "Issue 12: 1,000,000 devices").
CREATE INDEX IF NOT EXISTS devices_group_status_id ON devices(group_name, status, id);
