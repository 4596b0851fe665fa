-- Each user's number of sessions that have not ENDED, kept by the triggers
-- below on every path a session starts or ends by (see the PostgreSQL
-- migration of the same name). Allocate checks the session limit against it.
ALTER TABLE users ADD COLUMN live_sessions INTEGER NOT NULL DEFAULT 0;
UPDATE users SET live_sessions =
    (SELECT count(*) FROM sessions s WHERE s.user_id = users.id AND s.state <> 'ENDED');

CREATE TRIGGER sessions_count_started AFTER INSERT ON sessions
    WHEN NEW.state <> 'ENDED'
BEGIN
    UPDATE users SET live_sessions = live_sessions + 1 WHERE id = NEW.user_id;
END;
CREATE TRIGGER sessions_count_ended AFTER UPDATE OF state ON sessions
    WHEN OLD.state <> 'ENDED' AND NEW.state = 'ENDED'
BEGIN
    UPDATE users SET live_sessions = live_sessions - 1 WHERE id = OLD.user_id;
END;
CREATE TRIGGER sessions_count_restarted AFTER UPDATE OF state ON sessions
    WHEN OLD.state = 'ENDED' AND NEW.state <> 'ENDED'
BEGIN
    UPDATE users SET live_sessions = live_sessions + 1 WHERE id = NEW.user_id;
END;
CREATE TRIGGER sessions_count_deleted AFTER DELETE ON sessions
    WHEN OLD.state <> 'ENDED'
BEGIN
    UPDATE users SET live_sessions = live_sessions - 1 WHERE id = OLD.user_id;
END;
