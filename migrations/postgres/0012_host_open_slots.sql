-- The on-demand reservation (an Allocate that finds no warm box) used to
-- count every ACTIVE host's live boxes to find the fullest host with an
-- unoccupied slot: 48 ms a call at 15,000 mostly full hosts, on every
-- Allocate of a dry spell (BENCHMARKS.md run AB). The ranks now carry each
-- host's unoccupied slots too (capacity minus live boxes: SPAWNING, WAITING,
-- ALLOCATED, RUNNING, DYING; NULL when none), kept by the same maintenance
-- pass as `free_slots`, and the reservation walks this index from its start,
-- a page at a time, checking each host exactly under its lock. A full fleet
-- has no row in this index at all, so a dry spell costs one empty index probe.
-- A host's rank is also written when it connects, so a host that joins or
-- comes back is offered at once rather than at the next pass.
ALTER TABLE host_ranks ADD COLUMN open_slots INTEGER CHECK (open_slots > 0);

CREATE INDEX host_ranks_open_order ON host_ranks (region, open_slots, host_id) WHERE open_slots IS NOT NULL;

UPDATE host_ranks k SET open_slots = fresh.open_slots
FROM (
    SELECT h.id, NULLIF(GREATEST(h.capacity - count(m.id), 0), 0) AS open_slots
    FROM hosts h
    LEFT JOIN mandelboxes m ON m.host_id = h.id AND m.state IN ('SPAWNING', 'WAITING', 'ALLOCATED', 'RUNNING', 'DYING')
    GROUP BY h.id
) fresh
WHERE fresh.id = k.host_id;

-- An Allocate that finds neither a warm box nor room asks whether a box is
-- coming (`box_coming_in`: a SPAWNING, WAITING or DYING box on an ACTIVE host
-- of its regions) to answer PENDING rather than NO_CAPACITY. Asked from the
-- hosts' side it probed every host of the region when the answer was no, a
-- full fleet with nothing coming: 10 ms a call at 15,000 hosts. Each of the
-- three states now has an index that finds its boxes directly: WAITING by
-- region (`mandelboxes_waiting`), SPAWNING by age (`mandelboxes_spawning_since`,
-- the spawns in flight), and DYING by region, here: one more index entry per
-- box torn down.
CREATE INDEX mandelboxes_dying ON mandelboxes (region) WHERE state = 'DYING';
