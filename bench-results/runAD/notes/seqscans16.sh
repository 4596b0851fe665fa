#!/usr/bin/env bash
# Run AD: which tables the hot statements scan whole, and which functions (triggers) they call: the
# statistics views of the benchmark's database read 8 s apart inside a 16-client Allocate window.
# Usage: [EXTRA='--users-per-client 64'] seqscans16.sh BIN NAME (functions are counted with track_functions = 'pl' set for the run:
# ALTER SYSTEM SET track_functions = 'pl'; SELECT pg_reload_conf(); and ALTER SYSTEM RESET after)
set -euo pipefail
bin=$1 name=$2
cd "$(dirname "$0")/../../.."
log=/tmp/seqscans-$name.log
"$bin" run --backends postgres --scenarios alloc --clients 16 --window-s 20 --rounds 1 --warmup-s 1 ${EXTRA:-} \
  --out "bench-results/runAD/pg-$name" > "$log" 2>&1 &
pid=$!
until grep -q 'allocate x16' "$log" 2>/dev/null; do sleep 0.2; done
sleep 4
db=$(psql -h 127.0.0.1 -U postgres -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'sb_loadgen_%' ORDER BY oid DESC LIMIT 1")
snap() {
  psql -h 127.0.0.1 -U postgres -d "$db" -Atc "SELECT 'table', relname, seq_scan, seq_tup_read, idx_scan, n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables UNION ALL SELECT 'function', funcname, calls, total_time::bigint, self_time::bigint, 0, 0, 0 FROM pg_stat_user_functions"
}
before=$(snap); sleep 8; after=$(snap)
python3 - "$before" "$after" <<'PY'
import sys
def parse(s): return {tuple(l.split("|")[:2]): [int(x) for x in l.split("|")[2:]] for l in s.splitlines()}
b, a = parse(sys.argv[1]), parse(sys.argv[2])
print("kind|name|seq_scan|seq_tup_read (or fn ms)|idx_scan|ins|upd|hot_upd  (differences over 8 s)")
for k in sorted(a):
    d = [x - y for x, y in zip(a[k], b.get(k, [0]*6))]
    if any(d): print("|".join(k) + "|" + "|".join(map(str, d)))
PY
wait "$pid"
