#!/usr/bin/env bash
# Run AD: the limit scenario (bare claim, bare RPC, and the cycle's store calls with the server's group
# commits and no gRPC) at 16 clients, two binaries alternated. Usage: limit-ab.sh NAME_A BIN_A NAME_B BIN_B PAIRS
set -euo pipefail
name_a=$1 bin_a=$2 name_b=$3 bin_b=$4 pairs=$5
cd "$(dirname "$0")/../../.."
run() {
  "$2" run --backends postgres --scenarios limit --clients 16 --window-s 10 --warmup-s 1 \
    --out "bench-results/runAD/pg-limit-$1" > "/tmp/limit-$1.log" 2>&1
}
for i in $(seq "${FIRST:-1}" $((${FIRST:-1} + pairs - 1))); do
  if (( i % 2 == 1 )); then run "$name_a$i" "$bin_a"; run "$name_b$i" "$bin_b"
  else run "$name_b$i" "$bin_b"; run "$name_a$i" "$bin_a"; fi
done
