-- Run AD: a scratch database for the session-end counting micro-benchmark (ends-trigger.pgb): 128 users,
-- each with one RUNNING session on a box of its own (32 hosts x 12 in region r1), plus 20,000 ENDED.
INSERT INTO regions (name, enabled) VALUES ('r1', true) ON CONFLICT DO NOTHING;
INSERT INTO users (id, email, created_at) SELECT 'u' || g, 'u' || g || '@x', now() FROM generate_series(1, 128) g;
INSERT INTO hosts (id, region, image, agent_version, address, capacity, state, generation, created_at, updated_at)
SELECT 'h' || g, 'r1', 'img', '1', '10.0.0.' || g, 12, 'ACTIVE', 1, now(), now() FROM generate_series(1, 32) g;
INSERT INTO mandelboxes (id, host_id, region, app, state, session_id, token_hash, ports, created_at, updated_at)
SELECT md5('box' || g)::uuid, 'h' || (1 + g % 32), 'r1', 'app', 'RUNNING', md5('session' || g)::uuid, 't', '[]', now(), now()
FROM generate_series(1, 128) g;
INSERT INTO sessions (id, user_id, state, app, client_version, requested_regions, region, mandelbox_id, host_id, created_at, updated_at)
SELECT md5('session' || g)::uuid, 'u' || g, 'RUNNING', 'app', '1', '["r1"]', 'r1', md5('box' || g)::uuid, 'h' || (1 + g % 32), now(), now()
FROM generate_series(1, 128) g;
INSERT INTO sessions (id, user_id, state, app, client_version, requested_regions, end_reason, created_at, updated_at, ended_at)
SELECT gen_random_uuid(), 'u' || (1 + g % 128), 'ENDED', 'app', '1', '["r1"]', 'USER_ENDED', now(), now(), now()
FROM generate_series(1, 20000) g;
UPDATE users SET live_sessions = 1;
VACUUM ANALYZE;
