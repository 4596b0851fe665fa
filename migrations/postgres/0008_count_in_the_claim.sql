-- Allocate's statement (`claim_for_new_session`) now counts the session it
-- starts itself: its first step adds one to `users.live_sessions` if the user
-- is under the limit, an UPDATE that also takes the row lock. It used to lock
-- the row (SELECT ... FOR UPDATE, which writes a lock of its own to the row
-- and the WAL) and then this trigger updated the same row again. That
-- statement is the only one that inserts a session, so the insert trigger
-- goes; the triggers for a session's end, restart and deletion stay.
DROP TRIGGER sessions_count_started ON sessions;
