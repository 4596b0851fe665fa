-- Every state change of a box or a session writes a new entry into each
-- index over all rows (PostgreSQL cannot update a row in place when an
-- indexed column changes), and most of those entries are for finished rows
-- no query looks for by state: the hot paths read live rows only. The two
-- state indexes over every box, and the one over every session, become
-- indexes over the live rows; a box's last step (→ DEAD or LOST) and a
-- session's end (→ ENDED) then add nothing to them. Listings of finished
-- rows go by creation time (mandelboxes_created_at, sessions_created_at).
DROP INDEX mandelboxes_region_state;
DROP INDEX mandelboxes_host_state;
CREATE INDEX mandelboxes_live_by_region ON mandelboxes (region, state)
    WHERE state IN ('SPAWNING', 'WAITING', 'ALLOCATED', 'RUNNING', 'DYING');
DROP INDEX sessions_state_created_at;
CREATE INDEX sessions_live_by_state ON sessions (state, created_at) WHERE state <> 'ENDED';
--
-- SQLite keeps its indexes over every row: its planner uses a partial index
-- only for a query that repeats the index's condition term for term (a claim's
-- `state IN ('ALLOCATED', 'RUNNING')` would scan the table instead).
