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
