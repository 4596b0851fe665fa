-- Three indexes each allocation cycle writes and no hot path reads. No update
-- of a box or a session is HOT (their state is indexed), so every new row
-- version adds an entry to each index over all rows: a box's five versions
-- (SPAWNING, WAITING, RUNNING, DYING, DEAD) and a session's two (RUNNING,
-- ENDED) wrote seven entries into the two created_at indexes alone, a sixth
-- of the cycle's WAL records (BENCHMARKS.md, run O).
--
-- * mandelboxes_created_at, sessions_created_at: the listings are newest
--   first by id instead. Ids are UUIDv7 (time first, then a counter), so the
--   primary key already holds the rows in creation order.
-- * sessions_live_by_user: a user's live sessions are found through
--   sessions_user_state (user_id, state) with the live states named
--   (`state IN ('PENDING', 'ASSIGNING', 'RUNNING')`, three index seeks); the
--   session limit reads the user row's counter (migration 0005), not this.
DROP INDEX mandelboxes_created_at;
DROP INDEX sessions_created_at;
DROP INDEX sessions_live_by_user;
