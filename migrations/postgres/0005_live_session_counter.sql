-- Each user's number of sessions that have not ENDED, kept by the triggers
-- below on every path a session starts or ends by. Allocate checks the session
-- limit against this one value, read under the user row's lock in the same
-- statement as its claim, instead of locking the user and counting sessions in
-- round trips of their own.
ALTER TABLE users ADD COLUMN live_sessions INTEGER NOT NULL DEFAULT 0;
UPDATE users u SET live_sessions =
    (SELECT count(*) FROM sessions s WHERE s.user_id = u.id AND s.state <> 'ENDED');

CREATE FUNCTION session_started() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE users SET live_sessions = live_sessions + 1 WHERE id = NEW.user_id;
    RETURN NULL;
END $$;

CREATE FUNCTION session_ended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE users SET live_sessions = live_sessions - 1 WHERE id = OLD.user_id;
    RETURN NULL;
END $$;

CREATE TRIGGER sessions_count_started AFTER INSERT ON sessions
    FOR EACH ROW WHEN (NEW.state <> 'ENDED') EXECUTE FUNCTION session_started();
CREATE TRIGGER sessions_count_ended AFTER UPDATE OF state ON sessions
    FOR EACH ROW WHEN (OLD.state <> 'ENDED' AND NEW.state = 'ENDED') EXECUTE FUNCTION session_ended();
CREATE TRIGGER sessions_count_restarted AFTER UPDATE OF state ON sessions
    FOR EACH ROW WHEN (OLD.state = 'ENDED' AND NEW.state <> 'ENDED') EXECUTE FUNCTION session_started();
CREATE TRIGGER sessions_count_deleted AFTER DELETE ON sessions
    FOR EACH ROW WHEN (OLD.state <> 'ENDED') EXECUTE FUNCTION session_ended();
