-- :hosts hosts of capacity :cap; 90% of hosts full (all RUNNING), 10% with :cap/2 RUNNING and the rest WAITING
TRUNCATE sessions, mandelboxes, hosts, users, regions CASCADE;
INSERT INTO regions (name) VALUES ('us-east-1');
INSERT INTO hosts (id, region, state, image, agent_version, address, capacity, generation, created_at, updated_at)
SELECT 'host-' || lpad(g::text, 5, '0'), 'us-east-1', 'ACTIVE', 'img', 'v', '10.0.0.1', :cap, 1, now(), now()
FROM generate_series(1, :hosts) g;
INSERT INTO mandelboxes (id, host_id, region, app, state, session_id, token_hash, created_at, updated_at)
SELECT gen_random_uuid(), h.id, 'us-east-1', 'chrome',
       CASE WHEN right(h.id, 1) <> '7' OR s <= :cap / 2 THEN 'RUNNING' ELSE 'WAITING' END, gen_random_uuid(), 'x', now(), now()
FROM hosts h CROSS JOIN generate_series(1, :cap) s;
ANALYZE;
