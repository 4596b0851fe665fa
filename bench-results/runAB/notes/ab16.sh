#!/usr/bin/env bash
# Run AB's hot-path check: two binaries alternated (A B, B A, ...), PostgreSQL, alloc at 16 and 64 clients,
# 3 rounds of 10 s. Usage: [RUN=runAC] ab16.sh NAME_A BIN_A NAME_B BIN_B PAIRS (reports under bench-results/$RUN/)
set -euo pipefail
name_a=$1 bin_a=$2 name_b=$3 bin_b=$4 pairs=$5
cd "$(dirname "$0")/../../.."
run() {
  local out=bench-results/${RUN:-runAB}/pg-$1
  "$2" run --backends postgres --scenarios alloc --clients 16,64 --window-s 10 --rounds 3 --warmup-s 1 \
    --out "$out" > /tmp/ab16-$1.log 2>&1
}
for i in $(seq "${FIRST:-1}" $((${FIRST:-1} + pairs - 1))); do
  if (( i % 2 == 1 )); then run "$name_a$i" "$bin_a"; run "$name_b$i" "$bin_b"
  else run "$name_b$i" "$bin_b"; run "$name_a$i" "$bin_a"; fi
done
