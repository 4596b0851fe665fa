#!/usr/bin/env bash
# Run AD: executor time per statement of the hot path (pg_stat_statements, preloaded for this run and
# removed after), one binary, a planner setting given to the server's role alternated with the defaults.
# Each run: statistics reset, alloc at 16 clients (one round of 12 s), then the statements that ran more
# than 500 times. Usage: [EXTRA=...] statements-ab.sh BIN NAME 'SETTING = VALUE' PAIRS
set -euo pipefail
bin=$1 name=$2 setting=$3 pairs=$4
cd "$(dirname "$0")/../../.."
sql() { psql -h 127.0.0.1 -U postgres -d postgres "$@"; }
role() { sql -qc "ALTER ROLE postgres $1"; }
run() {
  sql -qAtc "SELECT pg_stat_statements_reset()" > /dev/null
  "$bin" run --backends postgres --scenarios alloc --clients 16 --window-s 12 --warmup-s 1 ${EXTRA:-} \
    --out "bench-results/runAD/pg-$1" > "/tmp/stmts-$1.log" 2>&1
  sql -qAtc "SELECT calls, rows, round(total_exec_time::numeric, 1) AS exec_ms, round((total_exec_time / calls * 1000)::numeric, 1) AS us_per_call,
                    round((total_exec_time / greatest(rows, 1) * 1000)::numeric, 1) AS us_per_row, shared_blks_hit, left(regexp_replace(query, '\s+', ' ', 'g'), 70)
             FROM pg_stat_statements WHERE calls > 500 AND dbid <> (SELECT oid FROM pg_database WHERE datname = 'postgres')
             ORDER BY total_exec_time DESC LIMIT 8" > "bench-results/runAD/pg-$1/statements.txt"
}
trap 'role "RESET ALL"' EXIT
for i in $(seq "${FIRST:-1}" $((${FIRST:-1} + pairs - 1))); do
  if (( i % 2 == 1 )); then run "stmts-default-$name$i"; role "SET $setting"; run "stmts-$name$i"; role "RESET ALL"
  else role "SET $setting"; run "stmts-$name$i"; role "RESET ALL"; run "stmts-default-$name$i"; fi
done
