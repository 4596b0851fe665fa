-- Each host's number of claimed boxes (ALLOCATED or RUNNING), so that a claim
-- ranks a region's hosts (the fullest first) by one row per host instead of
-- counting every host's boxes (see the PostgreSQL migration of the same name).
-- SQLite has one writer, so triggers keep the count exact on every path
-- (PostgreSQL recounts after each write instead: triggers there would lock the
-- counts in whatever order a write met them, and two writes could deadlock).
CREATE TABLE host_claims (
    host_id  TEXT PRIMARY KEY,
    claimed  INTEGER NOT NULL CHECK (claimed >= 0)
);
INSERT INTO host_claims (host_id, claimed)
SELECT h.id, (SELECT count(*) FROM mandelboxes m WHERE m.host_id = h.id AND m.state IN ('ALLOCATED', 'RUNNING'))
FROM hosts h;

CREATE TRIGGER mandelboxes_count_claimed_insert AFTER INSERT ON mandelboxes
    WHEN NEW.state IN ('ALLOCATED', 'RUNNING')
BEGIN
    INSERT INTO host_claims (host_id, claimed) VALUES (NEW.host_id, 1)
        ON CONFLICT (host_id) DO UPDATE SET claimed = claimed + 1;
END;
CREATE TRIGGER mandelboxes_count_claimed AFTER UPDATE OF state ON mandelboxes
    WHEN (OLD.state IN ('ALLOCATED', 'RUNNING')) <> (NEW.state IN ('ALLOCATED', 'RUNNING'))
BEGIN
    INSERT INTO host_claims (host_id, claimed)
        VALUES (NEW.host_id, CASE WHEN NEW.state IN ('ALLOCATED', 'RUNNING') THEN 1 ELSE 0 END)
        ON CONFLICT (host_id) DO UPDATE
        SET claimed = claimed + (CASE WHEN NEW.state IN ('ALLOCATED', 'RUNNING') THEN 1 ELSE -1 END);
END;
CREATE TRIGGER mandelboxes_count_claimed_delete AFTER DELETE ON mandelboxes
    WHEN OLD.state IN ('ALLOCATED', 'RUNNING')
BEGIN
    UPDATE host_claims SET claimed = claimed - 1 WHERE host_id = OLD.host_id;
END;
