#!/usr/bin/env bash
# Run AC's fleet check: two binaries alternated (A B, B A), PostgreSQL, 15,000 lean hosts, 20 s heartbeat window.
# Usage: [RUN=runAD] [EXTRA='--fleet-capacity 2'] fleet-ab.sh NAME_A BIN_A NAME_B BIN_B PAIRS (reports under
# bench-results/$RUN/, runAC by default)
set -euo pipefail
name_a=$1 bin_a=$2 name_b=$3 bin_b=$4 pairs=$5
cd "$(dirname "$0")/../../.."
ulimit -n 20000
run() {
  "$2" run --backends "${BACKEND:-postgres}" --scenarios fleet --fleet-hosts 15000 --fleet-per-process 5000 \
    --fleet-cpu-window-s 20 --push-limit 300 ${EXTRA:-} --out "bench-results/${RUN:-runAC}/fleet-$1" > "/tmp/fleet-$1.log" 2>&1
}
for i in $(seq "${FIRST:-1}" $((${FIRST:-1} + pairs - 1))); do
  if (( i % 2 == 1 )); then run "$name_a$i" "$bin_a"; run "$name_b$i" "$bin_b"
  else run "$name_b$i" "$bin_b"; run "$name_a$i" "$bin_a"; fi
done
