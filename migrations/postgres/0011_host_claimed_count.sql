-- Each host's number of claimed boxes (ALLOCATED or RUNNING), as last
-- counted, so that a claim ranks a region's hosts (the fullest first) by
-- reading one row per host instead of counting every host's boxes: that count
-- made a claim's cost grow with the fleet (0.5–0.8 ms of executor time at 32
-- hosts, 11 ms at 1,000 and 37 ms at 3,000 hosts of one region; BENCHMARKS.md,
-- run X).
--
-- The store recounts a host's claimed boxes after every write that claims or
-- frees one (`recount_claimed` below, a statement of its own once the write
-- has committed: a counter moved inside the write by triggers would lock its
-- rows in whatever order the write met them, and two writes could deadlock),
-- and the maintenance loop checks every count now and then. The count only
-- orders a claim's candidate hosts; capacity checks count the boxes
-- themselves. It has a table of its own so that a recount never waits for
-- the host row locks of the heartbeat and bookkeeping batches, and no
-- foreign key, whose check on insert would (hosts are never deleted).
CREATE TABLE host_claims (
    host_id  TEXT PRIMARY KEY,
    claimed  BIGINT NOT NULL CHECK (claimed >= 0)
);
INSERT INTO host_claims (host_id, claimed)
SELECT h.id, count(m.id) FROM hosts h
LEFT JOIN mandelboxes m ON m.host_id = h.id AND m.state IN ('ALLOCATED', 'RUNNING')
GROUP BY h.id;

-- The recount, in one round trip: the counts are locked in host id order,
-- then counted by a statement of its own, whose snapshot is taken once the
-- locks are held, so that it sees every write whose recount ran before it (in
-- one statement, a recount that waited for another's lock would write a
-- count older than the one it overwrites).
CREATE FUNCTION recount_claimed(host_ids TEXT[]) RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM host_claims WHERE host_id = ANY(host_ids) ORDER BY host_id FOR UPDATE;
    INSERT INTO host_claims (host_id, claimed)
    SELECT l.id, (SELECT count(*) FROM mandelboxes m
                  WHERE m.host_id = l.id AND m.state IN ('ALLOCATED', 'RUNNING'))
    FROM (SELECT DISTINCT id FROM unnest(host_ids) AS u(id)) l
    ORDER BY l.id
    ON CONFLICT (host_id) DO UPDATE SET claimed = excluded.claimed
        WHERE host_claims.claimed <> excluded.claimed;
END $$;
