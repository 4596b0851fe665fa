-- Each host's number of live boxes (SPAWNING, WAITING, ALLOCATED, RUNNING,
-- DYING), kept by the triggers below on every path a box is written by, and
-- an index of the ACTIVE hosts by room (capacity minus live boxes). The
-- on-demand reservation (an Allocate that finds no warm box) used to count
-- every host's boxes, inside the write transaction, to find the fullest host
-- with room: 41 ms at 15,000 full hosts, every writer waiting meanwhile
-- (BENCHMARKS.md run AB). It now walks this index from the first host with
-- room, and a full fleet costs one index probe. SQLite has one writer, so
-- the count costs no contention (on PostgreSQL a kept count was tried and
-- dropped in run X; that store keeps ranks refreshed by the maintenance pass).
ALTER TABLE hosts ADD COLUMN live_boxes INTEGER NOT NULL DEFAULT 0;
UPDATE hosts SET live_boxes = (
    SELECT count(*) FROM mandelboxes m
    WHERE m.host_id = hosts.id AND m.state IN ('SPAWNING', 'WAITING', 'ALLOCATED', 'RUNNING', 'DYING'));

CREATE INDEX hosts_room ON hosts (region, capacity - live_boxes, id) WHERE state = 'ACTIVE';

CREATE TRIGGER mandelboxes_count_inserted AFTER INSERT ON mandelboxes
    WHEN NEW.state IN ('SPAWNING', 'WAITING', 'ALLOCATED', 'RUNNING', 'DYING')
BEGIN
    UPDATE hosts SET live_boxes = live_boxes + 1 WHERE id = NEW.host_id;
END;
CREATE TRIGGER mandelboxes_count_updated AFTER UPDATE OF state, host_id ON mandelboxes
    WHEN (OLD.state IN ('SPAWNING', 'WAITING', 'ALLOCATED', 'RUNNING', 'DYING'))
             <> (NEW.state IN ('SPAWNING', 'WAITING', 'ALLOCATED', 'RUNNING', 'DYING'))
         OR OLD.host_id <> NEW.host_id
BEGIN
    UPDATE hosts SET live_boxes = live_boxes - 1
    WHERE id = OLD.host_id AND OLD.state IN ('SPAWNING', 'WAITING', 'ALLOCATED', 'RUNNING', 'DYING');
    UPDATE hosts SET live_boxes = live_boxes + 1
    WHERE id = NEW.host_id AND NEW.state IN ('SPAWNING', 'WAITING', 'ALLOCATED', 'RUNNING', 'DYING');
END;
CREATE TRIGGER mandelboxes_count_deleted AFTER DELETE ON mandelboxes
    WHEN OLD.state IN ('SPAWNING', 'WAITING', 'ALLOCATED', 'RUNNING', 'DYING')
BEGIN
    UPDATE hosts SET live_boxes = live_boxes - 1 WHERE id = OLD.host_id;
END;

-- `box_coming_in` (see migrations/postgres/0012_host_open_slots.sql): DYING
-- boxes by region, so that a "no" costs three short index walks instead of
-- a probe of every host of the region (16 ms at 15,000 full hosts).
CREATE INDEX mandelboxes_dying ON mandelboxes (region) WHERE state = 'DYING';
