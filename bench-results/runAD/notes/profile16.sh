#!/usr/bin/env bash
# Run AD: a system-wide CPU profile (perf, software clock) of 10 s inside a 16-client Allocate window on
# PostgreSQL. Usage: profile16.sh BIN NAME (report under bench-results/runAD/pg-NAME, perf data /tmp/NAME.data)
set -euo pipefail
bin=$1 name=$2
cd "$(dirname "$0")/../../.."
log=/tmp/profile-$name.log
"$bin" run --backends postgres --scenarios alloc --clients 16 --window-s 30 --rounds 1 --warmup-s 1 \
  --out "bench-results/runAD/pg-$name" > "$log" 2>&1 &
pid=$!
until grep -q 'allocate x16' "$log" 2>/dev/null; do sleep 0.2; done
sleep 6
perf record -e cpu-clock -a -g -o "/tmp/$name.data" -- sleep 10 > /dev/null 2>&1
wait "$pid"
