#!/usr/bin/env bash
# Run AD: one binary, the clients' user population alternated (--users-per-client 8, the default, against
# N): how much of the database's work per allocation comes from 128 user rows each updated ~40 times a
# second. PostgreSQL, alloc at 16 clients, 3 rounds of 10 s. Usage: users-ab.sh BIN N PAIRS
set -euo pipefail
bin=$1 users=$2 pairs=$3
cd "$(dirname "$0")/../../.."
run() {
  "$bin" run --backends postgres --scenarios alloc --clients 16 --window-s 10 --rounds 3 --warmup-s 1 \
    --users-per-client "$2" --out "bench-results/runAD/pg-users$2-$1" > "/tmp/users-$2-$1.log" 2>&1
}
for i in $(seq "${FIRST:-1}" $((${FIRST:-1} + pairs - 1))); do
  if (( i % 2 == 1 )); then run "$i" 8; run "$i" "$users"
  else run "$i" "$users"; run "$i" 8; fi
done
