-- The session insert's two foreign-key checks go. Each ran a query of its own
-- for every session and wrote a row lock (KEY SHARE) to the WAL on a row the
-- same statement had just written: Allocate's statement inserts the session
-- only for the user row its first step updated and the box its claim updated,
-- and no user, box or session row is ever deleted, so neither check could
-- fail (the store contract test sessions_name_existing_users_and_boxes checks
-- the references). mandelboxes.host_id keeps its reference (a box's insert
-- checks a host row that the reservation has locked already). SQLite keeps
-- both: it cannot drop a constraint without rebuilding the table, and there
-- a check is one index lookup with nothing logged.
ALTER TABLE sessions DROP CONSTRAINT sessions_user_id_fkey;
ALTER TABLE sessions DROP CONSTRAINT sessions_mandelbox_id_fkey;
