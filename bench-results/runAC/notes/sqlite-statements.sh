#!/usr/bin/env bash
# Run AC: the SQLite statements the refill sweep and the host listing read, at 15,000 hosts x 8
# (sqlite-fleet.sql on the migrated schema). Each timed 20 times in one sqlite3 session; prints ms per run.
set -euo pipefail
db=${1:-/tmp/sq-ac.db}
time_it() {
  local name=$1 sql=$2
  local start end
  start=$(date +%s%N)
  { for _ in $(seq 20); do echo "$sql"; done; } | sqlite3 "$db" > /dev/null
  end=$(date +%s%N)
  echo "$name: $(( (end - start) / 20000 )) us per run (20 runs, one sqlite3 process)"
}
time_it "list_hosts before (three counts)" "SELECT h.id, h.region, h.state, h.image, h.agent_version, h.address, h.capacity, h.generation, h.last_heartbeat_at, h.disconnected_at, h.terminated_at, h.created_at, h.updated_at, (SELECT count(*) FROM mandelboxes m WHERE m.host_id = h.id AND m.state IN ('SPAWNING', 'WAITING')) AS warm, (SELECT count(*) FROM mandelboxes m WHERE m.host_id = h.id AND m.state IN ('ALLOCATED', 'RUNNING')) AS assigned, (SELECT count(*) FROM mandelboxes m WHERE m.host_id = h.id AND m.state IN ('SPAWNING', 'WAITING', 'ALLOCATED', 'RUNNING', 'DYING')) AS live FROM hosts h WHERE (NULL IS NULL OR h.region = NULL) AND h.terminated_at IS NULL ORDER BY h.id;"
time_it "list_hosts after (live from hosts.live_boxes)" "SELECT h.id, h.region, h.state, h.image, h.agent_version, h.address, h.capacity, h.generation, h.last_heartbeat_at, h.disconnected_at, h.terminated_at, h.created_at, h.updated_at, (SELECT count(*) FROM mandelboxes m WHERE m.host_id = h.id AND m.state IN ('SPAWNING', 'WAITING')) AS warm, (SELECT count(*) FROM mandelboxes m WHERE m.host_id = h.id AND m.state IN ('ALLOCATED', 'RUNNING')) AS assigned, h.live_boxes AS live FROM hosts h WHERE (NULL IS NULL OR h.region = NULL) AND h.terminated_at IS NULL ORDER BY h.id;"
time_it "hosts_with_open_slots (1,500 with room)" "SELECT id FROM hosts WHERE state = 'ACTIVE' AND capacity - live_boxes > 0 ORDER BY id;"
time_it "connected_hosts_changed_before" "SELECT id, region, state, image, agent_version, address, capacity, generation, last_heartbeat_at, disconnected_at, terminated_at, created_at, updated_at FROM hosts WHERE state IN ('ACTIVE', 'DRAINING') AND updated_at < 1 ORDER BY id;"
time_it "(an empty statement, the process's own cost)" "SELECT 1;"
echo "plan of hosts_with_open_slots:"; sqlite3 "$db" "EXPLAIN QUERY PLAN SELECT id FROM hosts WHERE state = 'ACTIVE' AND capacity - live_boxes > 0 ORDER BY id;"
