-- The order in which a claim tries a region's hosts, as last computed: the
-- fullest first (fewest free slots: capacity minus ALLOCATED and RUNNING
-- boxes), full hosts last (free_slots NULL), then host id. A claim used to
-- count every candidate host's claimed boxes and sort the region's hosts,
-- which made its cost grow with the fleet (0.8 ms at 32 hosts, 11–20 ms at
-- 1,000 idle hosts and 34–41 ms at 3,000, BENCHMARKS.md run X); it now walks
-- this index from its start and stops at the first host with a box it can
-- take, and counts nothing.
--
-- The sweeping replica recomputes the table every maintenance pass
-- (`refresh_host_ranks`: ACTIVE hosts only). Claims only read it, so a
-- rank is at most one pass old and nothing a claim or a disconnect writes
-- waits for it. That only moves the preference between hosts: every claim
-- still checks the host and the box themselves (state, image, app, lock), and
-- a host missing from the table (new, or back since the last pass) or a box
-- beyond the walk's window is found by the exact ranking the claim falls back
-- to when the window gives no box (`pg_best_hosts!` in store/postgres.rs).
--
-- No foreign key: its check would take a share lock on the host row on every
-- refresh, against the heartbeat and bookkeeping batches' locks.
CREATE TABLE host_ranks (
    host_id    TEXT PRIMARY KEY,
    region     TEXT NOT NULL,
    free_slots INTEGER CHECK (free_slots > 0)
);
CREATE INDEX host_ranks_claim_order ON host_ranks (region, free_slots, host_id);

INSERT INTO host_ranks (host_id, region, free_slots)
SELECT h.id, h.region, NULLIF(GREATEST(h.capacity - count(m.id), 0), 0)
FROM hosts h
LEFT JOIN mandelboxes m ON m.host_id = h.id AND m.state IN ('ALLOCATED', 'RUNNING')
WHERE h.state = 'ACTIVE'
GROUP BY h.id;
