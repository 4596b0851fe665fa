\timing on
PREPARE base AS SELECT h.id FROM hosts h
         LEFT JOIN regions r ON r.name = h.region
         CROSS JOIN LATERAL (SELECT count(*) AS busy FROM mandelboxes a
                             WHERE a.host_id = h.id AND a.state IN ('ALLOCATED', 'RUNNING')) load
         WHERE h.state = 'ACTIVE' AND h.region = ANY('{us-east-1}')
           AND h.id IN (SELECT w.host_id FROM mandelboxes w
                        WHERE w.state = 'WAITING' AND w.app = 'chrome' AND w.region = ANY('{us-east-1}'))
           AND (COALESCE(r.image, '') = '' OR h.image = r.image)
           AND h.id <> ALL('{}')
         ORDER BY array_position('{us-east-1}'::text[], h.region), h.capacity - load.busy, h.id;
SELECT 'base'; EXECUTE base \g /dev/null
EXECUTE base \g /dev/null
EXECUTE base \g /dev/null
EXECUTE base \g /dev/null
EXECUTE base \g /dev/null
