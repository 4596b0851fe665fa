#!/usr/bin/env bash
# Regenerates every figure in simulator/REPORT.md (a few minutes on two
# cores, release build). Outputs go to $OUT (default
# $CARGO_TARGET_DIR/fleet-sim/report): one Markdown and one JSON file per
# section, to paste into the report.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-$CARGO_TARGET_DIR/fleet-sim/report}
mkdir -p "$OUT"
cargo build -p fleet-sim --release
SIM="$CARGO_TARGET_DIR/release/fleet-sim"
run() { local name=$1; shift; "$SIM" "$@" --quiet --out "$OUT/$name.md" --json "$OUT/$name.json"; }

# 1. The day at the recommended defaults, and the same day draining out after 22:00.
run day run
run drain-out run --hours 32 --demand-ends-at-hour 22
# 2. The standard sweep: buffers x scale-down delay x cooldown, 10 seeds per cell.
run sweep sweep --seeds 10
# 3. Buffer against delay near the recommended buffer: what each miss rate costs.
run frontier sweep --seeds 10 --buffers 10,11,12,13,14,15,16 --scale-down-delays-s 60,120,300,600,900 --cooldowns-s 0
# 4. The buffer each region size needs (at the default timings).
for peak in 1 2 6 20 60; do
  run "buffer-peak-$peak" sweep --seeds 6 --peak-per-minute "$peak" --max-instances 5000 \
    --buffers 2,4,5,6,7,8,10,12,16,22,24,32,48,64 --scale-down-delays-s 300 --cooldowns-s 300
done
# 5. The scale-down delay at each region size, around its ≤1% buffer.
for pb in "1 5,6" "2 7,8" "20 22,24" "60 48,52"; do
  set -- $pb
  run "delay-peak-$1" sweep --seeds 8 --peak-per-minute "$1" --max-instances 5000 --buffers "$2" \
    --scale-down-delays-s 120,300,600 --cooldowns-s 0
done
# 6. Launch timeout, on a normal day and on a day of a broken image.
run timeout sweep --seeds 8 --buffers 12 --scale-down-delays-s 300 --cooldowns-s 300 \
  --launch-timeouts-s 180,240,300,450,600,900
run timeout-bad-image sweep --seeds 8 --buffers 12 --scale-down-delays-s 300 --cooldowns-s 300 \
  --never-connect-rate 0.3 --launch-timeouts-s 300,450,600,900,1200
# 7. What-ifs: proposed planner changes, emulated.
run waiting-users sweep --seeds 10 --buffers 0,2,4,8,12 --scale-down-delays-s 300 --cooldowns-s 300
for peak in 1 2 6 20 60; do
  run "what-if-demand-buffer-$peak" sweep --seeds 6 --peak-per-minute "$peak" --max-instances 5000 \
    --buffers 2 --scale-down-delays-s 300 --cooldowns-s 300 --what-if-demand-buffer-lead-s 300
done
echo "written to $OUT"
