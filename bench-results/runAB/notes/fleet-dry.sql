-- :hosts hosts of capacity :cap, a dry spell: no WAITING box; hosts whose id ends in 7 have 2 slots
-- unoccupied (the rest RUNNING), every other host full (all RUNNING); 20,000 DEAD rows of history.
TRUNCATE sessions, mandelboxes, hosts, users, regions, host_ranks CASCADE;
INSERT INTO regions (name) VALUES ('us-east-1');
INSERT INTO hosts (id, region, state, image, agent_version, address, capacity, generation, created_at, updated_at)
SELECT 'host-' || lpad(g::text, 5, '0'), 'us-east-1', 'ACTIVE', 'img', 'v', '10.0.0.1', :cap, 1, now(), now()
FROM generate_series(1, :hosts) g;
INSERT INTO mandelboxes (id, host_id, region, app, state, session_id, token_hash, created_at, updated_at)
SELECT gen_random_uuid(), h.id, 'us-east-1', 'chrome', 'RUNNING', gen_random_uuid(), 'x', now(), now()
FROM hosts h CROSS JOIN generate_series(1, :cap) s
WHERE right(h.id, 1) <> '7' OR s <= :cap - 2;
INSERT INTO mandelboxes (id, host_id, region, app, state, session_id, token_hash, created_at, updated_at)
SELECT gen_random_uuid(), 'host-' || lpad((1 + g % :hosts)::text, 5, '0'), 'us-east-1', 'chrome', 'DEAD', gen_random_uuid(), 'x', now(), now()
FROM generate_series(1, 20000) g;
INSERT INTO host_ranks (host_id, region, free_slots)
SELECT h.id, h.region, NULLIF(GREATEST(h.capacity - count(m.id), 0), 0)
FROM hosts h LEFT JOIN mandelboxes m ON m.host_id = h.id AND m.state IN ('ALLOCATED', 'RUNNING')
WHERE h.state = 'ACTIVE' GROUP BY h.id;
VACUUM ANALYZE;
