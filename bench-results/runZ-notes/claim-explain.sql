BEGIN; EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) WITH best AS MATERIALIZED (
SELECT b.id FROM (SELECT u.name, min(u.ord) AS ord FROM unnest('{us-east-1}'::text[]) WITH ORDINALITY AS u(name, ord)
                  WHERE EXISTS (SELECT 1 FROM mandelboxes w WHERE w.region = u.name AND w.app = 'chrome' AND w.state = 'WAITING')
                  GROUP BY u.name ORDER BY 2) reg
CROSS JOIN LATERAL (
    (SELECT h.id FROM (SELECT k.host_id FROM host_ranks k WHERE k.region = reg.name
                       ORDER BY k.free_slots, k.host_id LIMIT 64) k
     CROSS JOIN LATERAL (SELECT h.id FROM hosts h LEFT JOIN regions r ON r.name = h.region
                         WHERE h.id = k.host_id AND h.region = reg.name AND h.state = 'ACTIVE'
                           AND (COALESCE(r.image, '') = '' OR h.image = r.image) AND h.id <> ALL('{}')
                         OFFSET 0) h)
    UNION ALL
    (SELECT h.id FROM hosts h
     LEFT JOIN regions r ON r.name = h.region
     LEFT JOIN (SELECT k.host_id FROM host_ranks k WHERE k.region = reg.name
                ORDER BY k.free_slots, k.host_id LIMIT 64) seen ON seen.host_id = h.id
     CROSS JOIN LATERAL (SELECT count(*) AS busy FROM mandelboxes a
                         WHERE a.host_id = h.id AND a.state IN ('ALLOCATED', 'RUNNING')) load
     WHERE seen.host_id IS NULL AND h.state = 'ACTIVE' AND h.region = reg.name
       AND h.id IN (SELECT w.host_id FROM mandelboxes w
                    WHERE w.state = 'WAITING' AND w.app = 'chrome' AND w.region = reg.name)
       AND (COALESCE(r.image, '') = '' OR h.image = r.image) AND h.id <> ALL('{}')
     ORDER BY h.capacity - load.busy, h.id)
) b
) SELECT c.id FROM best CROSS JOIN LATERAL (SELECT m.id FROM mandelboxes m WHERE m.host_id = best.id AND m.state = 'WAITING' AND m.app = 'chrome' AND m.region = ANY('{us-east-1}') ORDER BY m.created_at, m.id LIMIT 1 FOR UPDATE SKIP LOCKED) c LIMIT 1; ROLLBACK;
