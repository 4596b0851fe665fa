-- A session's end gives its user's place back once per statement, not once
-- per row. The row triggers of 0005 called a PL/pgSQL function for every
-- session a statement ended, each running its own UPDATE of the user: with
-- ReportDisconnect's ends written in batches, that was about 26 us of the
-- database per ended session and, with the trigger queue around it, 9% of
-- PostgreSQL's CPU under load (BENCHMARKS.md, run AD). A statement-level
-- trigger sees the statement's changed rows as two transition tables and
-- counts them in one UPDATE, whatever path ended them.
--
-- A trigger with transition tables cannot name columns (UPDATE OF state), so
-- it runs after every UPDATE of sessions and counts only the rows whose
-- ENDED-ness changed: ended (-1) and, should any path ever reopen one,
-- reopened (+1). The users are locked in id order, as every statement that
-- locks several users does, so two statements ending sessions of the same
-- users cannot deadlock on them. The delete trigger stays a row trigger (no
-- path deletes sessions).
DROP TRIGGER sessions_count_ended ON sessions;
DROP TRIGGER sessions_count_restarted ON sessions;

CREATE FUNCTION sessions_count_state_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH change AS (
        SELECT o.user_id, sum(CASE WHEN n.state = 'ENDED' THEN -1 ELSE 1 END)::integer AS places
        FROM changed_from o JOIN changed_to n ON n.id = o.id
        WHERE (o.state = 'ENDED') <> (n.state = 'ENDED')
        GROUP BY o.user_id
    ), locked AS MATERIALIZED (
        SELECT u.id FROM users u WHERE u.id IN (SELECT user_id FROM change) ORDER BY u.id FOR UPDATE
    )
    UPDATE users u SET live_sessions = u.live_sessions + c.places
    FROM change c JOIN locked l ON l.id = c.user_id
    WHERE u.id = c.user_id AND c.places <> 0;
    RETURN NULL;
END $$;

CREATE TRIGGER sessions_count_state_changes AFTER UPDATE ON sessions
    REFERENCING OLD TABLE AS changed_from NEW TABLE AS changed_to
    FOR EACH STATEMENT EXECUTE FUNCTION sessions_count_state_changes();
