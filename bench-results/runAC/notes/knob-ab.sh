#!/usr/bin/env bash
# Run AC: one binary, tokio's scheduler knobs set through the environment (both processes: loadgen and its
# `loadgen serve` child inherit it), alternated with the defaults. PostgreSQL, alloc at 16 and 64 clients,
# 3 rounds of 10 s. Usage: knob-ab.sh BIN NAME VAR=VALUE PAIRS
set -euo pipefail
bin=$1 name=$2 setting=$3 pairs=$4
cd "$(dirname "$0")/../../.."
run() {
  local out=bench-results/runAC/pg-$1; shift
  env "$@" "$bin" run --backends postgres --scenarios alloc --clients 16,64 --window-s 10 --rounds 3 --warmup-s 1 \
    --out "$out" > "/tmp/knob-$(basename "$out").log" 2>&1
}
for i in $(seq "${FIRST:-1}" $((${FIRST:-1} + pairs - 1))); do
  if (( i % 2 == 1 )); then run "default$i" X=1; run "$name$i" "$setting"
  else run "$name$i" "$setting"; run "default$i" X=1; fi
done
