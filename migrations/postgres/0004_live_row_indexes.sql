-- The hot paths (a user's session count, the claim, a host's free slots, the
-- spawn sweep) look only at live rows, while ended sessions and finished boxes
-- accumulate with every allocation. Indexes over the live rows alone keep
-- those lookups as small as the live fleet, however long the history grows.
CREATE INDEX sessions_live_by_user ON sessions (user_id) WHERE state <> 'ENDED';
CREATE INDEX mandelboxes_waiting ON mandelboxes (region, app) WHERE state = 'WAITING';
CREATE INDEX mandelboxes_live_by_host ON mandelboxes (host_id, state)
    WHERE state IN ('SPAWNING', 'WAITING', 'ALLOCATED', 'RUNNING', 'DYING');
DROP INDEX mandelboxes_state_updated_at;
CREATE INDEX mandelboxes_spawning_since ON mandelboxes (updated_at) WHERE state = 'SPAWNING';

-- Every allocation cycle leaves dead row versions in these two tables (their
-- state column is indexed, so no update is HOT): vacuum and analyze them
-- after 2% churn instead of PostgreSQL's default 20%/10%.
ALTER TABLE sessions SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
ALTER TABLE mandelboxes SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
