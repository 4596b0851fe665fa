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
PREPARE two AS SELECT h.id FROM hosts h
         LEFT JOIN regions r ON r.name = h.region
         WHERE h.state = 'ACTIVE' AND h.region = ANY('{us-east-1}')
           AND h.id IN (SELECT w.host_id FROM mandelboxes w
                        WHERE w.state = 'WAITING' AND w.app = 'chrome' AND w.region = ANY('{us-east-1}'))
           AND (COALESCE(r.image, '') = '' OR h.image = r.image)
           AND h.id <> ALL('{}')
         ORDER BY array_position('{us-east-1}'::text[], h.region),
                  h.capacity - (SELECT count(*) FROM mandelboxes a WHERE a.host_id = h.id AND a.state = 'RUNNING')
                             - (SELECT count(*) FROM mandelboxes a WHERE a.host_id = h.id AND a.state = 'ALLOCATED'), h.id;
PREPARE grp AS SELECT h.id FROM hosts h
         LEFT JOIN regions r ON r.name = h.region
         LEFT JOIN (SELECT a.host_id, count(*) AS busy FROM mandelboxes a
                    WHERE a.state IN ('ALLOCATED', 'RUNNING') AND a.region = ANY('{us-east-1}') GROUP BY a.host_id) load ON load.host_id = h.id
         WHERE h.state = 'ACTIVE' AND h.region = ANY('{us-east-1}')
           AND h.id IN (SELECT w.host_id FROM mandelboxes w
                        WHERE w.state = 'WAITING' AND w.app = 'chrome' AND w.region = ANY('{us-east-1}'))
           AND (COALESCE(r.image, '') = '' OR h.image = r.image)
           AND h.id <> ALL('{}')
         ORDER BY array_position('{us-east-1}'::text[], h.region), h.capacity - COALESCE(load.busy, 0), h.id;
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
SELECT 'base';
EXECUTE base \g /dev/null
SELECT 'two';
EXECUTE two \g /dev/null
SELECT 'grp';
EXECUTE grp \g /dev/null
