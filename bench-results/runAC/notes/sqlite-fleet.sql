-- 15,000 ACTIVE hosts of capacity 8: hosts whose id ends in 7 have 2 unoccupied slots, the rest full
-- (RUNNING boxes; the triggers of migration 0008 keep hosts.live_boxes); 20,000 DEAD boxes of history.
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 15000)
INSERT INTO hosts (id, region, state, image, agent_version, address, capacity, generation, created_at, updated_at)
SELECT 'host-' || substr('00000' || n, -5), 'us-east-1', 'ACTIVE', 'img', 'v', '10.0.0.1', 8, 1, 0, 0 FROM g;
WITH RECURSIVE s(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM s WHERE k < 8)
INSERT INTO mandelboxes (id, host_id, region, app, state, session_id, token_hash, created_at, updated_at)
SELECT h.id || '-' || k, h.id, 'us-east-1', 'chrome', 'RUNNING', h.id || '-s' || k, 'x', 0, 0
FROM hosts h CROSS JOIN s WHERE substr(h.id, -1) <> '7' OR k <= 6;
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 20000)
INSERT INTO mandelboxes (id, host_id, region, app, state, session_id, token_hash, created_at, updated_at)
SELECT 'dead-' || n, 'host-' || substr('00000' || (1 + n % 15000), -5), 'us-east-1', 'chrome', 'DEAD', 'd' || n, 'x', 0, 0 FROM g;
ANALYZE;
