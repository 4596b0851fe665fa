#!/bin/bash
# Run Z: a claim's choice of box on a churned host, with and without bitmap scans, on the scratch database
# (BENCHMARKS.md "The commands"): run X's idle fleet of 32 hosts x 12, analyzed; the choice of box (run Y's
# walk, in a transaction rolled back) timed by pgbench, one client, 3 s; then 60,000 allocation cycles
# (churn.sql: a host's oldest WAITING box RUNNING, DYING, DEAD, a WAITING replacement) with no vacuum; then
# the choice again: with bitmap scans (the planner's pick), then without them twice (plain index scans,
# which mark the dead entries they pass), then with them once more (the marks stay).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export PGHOST=${PGHOST:-127.0.0.1} PGUSER=${PGUSER:-postgres}
sed '/\\timing/,$d' "$here/../runX-notes/fleet-idle.sql" | psql -q -d scratch -v hosts=32 -v cap=12 >/dev/null 2>&1
psql -q -d scratch -c "DELETE FROM host_ranks" -c "INSERT INTO host_ranks (host_id, region, free_slots)
    SELECT h.id, h.region, NULLIF(GREATEST(h.capacity - count(m.id), 0), 0) FROM hosts h
    LEFT JOIN mandelboxes m ON m.host_id = h.id AND m.state IN ('ALLOCATED', 'RUNNING')
    WHERE h.state = 'ACTIVE' GROUP BY h.id" -c "VACUUM ANALYZE" >/dev/null
work=$(mktemp -d)
{ echo "BEGIN;"; echo "WITH best AS MATERIALIZED ("; cat "$here/../runY-notes/ranking-walk.sql.part"
  echo ") SELECT c.id FROM best CROSS JOIN LATERAL (SELECT m.id FROM mandelboxes m WHERE m.host_id = best.id \
AND m.state = 'WAITING' AND m.app = 'chrome' AND m.region = ANY('{us-east-1}') ORDER BY m.created_at, m.id LIMIT 1 \
FOR UPDATE SKIP LOCKED) c LIMIT 1;"; echo "ROLLBACK;"; } > "$work/walk.pgb"
time_it() { # label, PGOPTIONS
    ms=$(PGOPTIONS=$2 pgbench -n -M prepared -c1 -T3 -f "$work/walk.pgb" scratch 2>/dev/null | sed -n 's/latency average = \(.*\) ms/\1/p')
    buffers=$(PGOPTIONS=$2 psql -d scratch -Atc "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) $(sed -n '/WITH best/,/LIMIT 1;/p' "$work/walk.pgb")" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Plan"]["Shared Hit Blocks"])')
    echo "$1: $ms ms, $buffers buffers"
}
time_it "fresh, bitmap scans allowed" ""
sed 's/\bN\b/60000/' "$here/churn.sql" | psql -q -d scratch
time_it "after 60,000 cycles, bitmap scans allowed" ""
time_it "same, bitmap scans allowed (again)" ""
time_it "same, enable_bitmapscan = off" "-c enable_bitmapscan=off"
time_it "same, enable_bitmapscan = off (again)" "-c enable_bitmapscan=off"
time_it "same, bitmap scans allowed once more" ""
rm -r "$work"
