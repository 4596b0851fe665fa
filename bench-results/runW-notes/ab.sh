#!/usr/bin/env bash
# Run W's A/B (also run X's, with PREFIX=runX-pg...): two binaries alternated (A B B A ...), PostgreSQL, 16 and 64 clients in 4 rounds,
# CPU by process sampled beside each run. Usage: [SUSTAINED=60] ab.sh NAME_A BIN_A NAME_B BIN_B PAIRS [extra loadgen args]
set -euo pipefail
name_a=$1 bin_a=$2 name_b=$3 bin_b=$4 pairs=$5; shift 5
cd "$(dirname "$0")/../.."
run() {
  local name=$1 bin=$2; shift 2
  local out=bench-results/${PREFIX:-runW-pg}-$name
  mkdir -p "$out"
  "$bin" run --backends postgres --scenarios alloc,limit --clients 16,64 --window-s 20 --rounds 4 \
    --warmup-s 1 --out "$out" "$@" > "$out/run.log" 2>&1 &
  local pid=$!
  : > "$out/cpu-by-process.txt"
  while kill -0 "$pid" 2>/dev/null; do
    python3 bench-results/runT-pg-cpu-split/cpu_by_process.py 2.5 >> "$out/cpu-by-process.txt"
  done
  wait "$pid"
  # SUSTAINED=S adds S seconds at 64 clients on a fresh database (run Z: 20 s rounds hid a decay that took
  # a minute to show); its progress log gives the rate per 10 s (runZ-notes/rates.py).
  if [ -n "${SUSTAINED:-}" ]; then
    "$bin" run --backends postgres --scenarios alloc --clients 64 --window-s "$SUSTAINED" --warmup-s 2 \
      --out "$out/sustained64" "$@" > "$out/sustained64.log" 2>&1
    python3 bench-results/runZ-notes/rates.py "$out/sustained64.log" > "$out/sustained64-per-10s.txt"
  fi
}
first=${FIRST:-1}
for i in $(seq "$first" $((first + pairs - 1))); do
  if (( i % 2 == 1 )); then run "$name_a$i" "$bin_a" "$@"; run "$name_b$i" "$bin_b" "$@"
  else run "$name_b$i" "$bin_b" "$@"; run "$name_a$i" "$bin_a" "$@"; fi
done
