#!/bin/bash
# Run Y: the claim's choice of box (its `best` CTE and the box walk, in a transaction rolled back), before
# (ranking-base.sql.part: every candidate host's claimed boxes counted) and after (ranking-walk.sql.part:
# host_ranks walked, the exact ranking only past its window), on a scratch database per fleet shape
# (run X's fleet-idle.sql and fleet-mostly-full.sql), with the app the pool holds ("chrome") and with one
# it has no box of ("nope": the region is skipped). Prints pgbench's mean latency, one client, 3 s each,
# the queries alternated twice. Needs the scratch database with the migrations applied (BENCHMARKS.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
x=$here/../runX-notes
work=$(mktemp -d)
statement() { # best part, app
    echo "BEGIN;"
    echo "WITH best AS MATERIALIZED ("
    sed "s/'chrome'/'$2'/" "$1"
    echo ") SELECT c.id FROM best CROSS JOIN LATERAL (SELECT m.id FROM mandelboxes m WHERE m.host_id = best.id \
AND m.state = 'WAITING' AND m.app = '$2' AND m.region = ANY('{us-east-1}') ORDER BY m.created_at, m.id LIMIT 1 \
FOR UPDATE SKIP LOCKED) c LIMIT 1;"
    echo "ROLLBACK;"
}
statement "$here/ranking-base.sql.part" chrome > "$work/base.pgb"
statement "$here/ranking-walk.sql.part" chrome > "$work/walk.pgb"
statement "$here/ranking-base.sql.part" nope > "$work/base-none.pgb"
statement "$here/ranking-walk.sql.part" nope > "$work/walk-none.pgb"
for shape in "idle 32 12" "full 32 8" "idle 1000 12" "full 1000 8" "idle 3000 12" "full 15000 8"; do
    set -- $shape
    fleet=$x/fleet-idle.sql; [ "$1" = full ] && fleet=$x/fleet-mostly-full.sql
    sed '/\\timing/,$d' "$fleet" | psql -q -d scratch -v hosts="$2" -v cap="$3" >/dev/null 2>&1
    psql -q -d scratch -c "DELETE FROM host_ranks" -c "INSERT INTO host_ranks (host_id, region, free_slots)
        SELECT h.id, h.region, NULLIF(GREATEST(h.capacity - count(m.id), 0), 0) FROM hosts h
        LEFT JOIN mandelboxes m ON m.host_id = h.id AND m.state IN ('ALLOCATED', 'RUNNING')
        WHERE h.state = 'ACTIVE' GROUP BY h.id" -c "VACUUM ANALYZE" >/dev/null
    line="$1 $2 hosts x $3:"
    for round in 1 2; do
        for q in base walk base-none walk-none; do
            ms=$(pgbench -n -M prepared -c1 -T3 -f "$work/$q.pgb" scratch 2>/dev/null | sed -n 's/latency average = \(.*\) ms/\1/p')
            line="$line $q $ms"
        done
    done
    echo "$line"
done
rm -r "$work"
