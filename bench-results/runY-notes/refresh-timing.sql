-- Run Y: the sweeper's refresh of host_ranks (as in PgStore::refresh_host_ranks), timed on the scratch database
-- after ranking-walk.sh (its last fleet: 15,000 hosts x 8, 90% full). psql -d scratch -f refresh-timing.sql
\timing on
BEGIN;
DELETE FROM host_ranks k USING hosts h WHERE h.id = k.host_id AND h.state <> 'ACTIVE';
WITH fresh AS (
    SELECT h.id, h.region, NULLIF(GREATEST(h.capacity - count(m.id), 0), 0) AS free_slots FROM hosts h
    LEFT JOIN mandelboxes m ON m.host_id = h.id AND m.state IN ('ALLOCATED', 'RUNNING')
    WHERE h.state = 'ACTIVE' GROUP BY h.id)
INSERT INTO host_ranks (host_id, region, free_slots)
SELECT f.id, f.region, f.free_slots FROM fresh f LEFT JOIN host_ranks k ON k.host_id = f.id
WHERE k.host_id IS NULL OR (k.region, k.free_slots) IS DISTINCT FROM (f.region, f.free_slots)
ORDER BY f.id
ON CONFLICT (host_id) DO UPDATE SET region = excluded.region, free_slots = excluded.free_slots;
COMMIT;
