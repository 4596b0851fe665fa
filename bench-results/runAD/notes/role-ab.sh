#!/usr/bin/env bash
# Run AD: one binary, a planner setting given to every new session of the role the server connects as
# (ALTER ROLE postgres SET ...; reset after each run), alternated with the defaults. PostgreSQL, alloc at
# 16 clients, 3 rounds of 10 s. Usage: [EXTRA='--users-per-client 64'] role-ab.sh BIN NAME 'SETTING = VALUE' PAIRS
set -euo pipefail
bin=$1 name=$2 setting=$3 pairs=$4
cd "$(dirname "$0")/../../.."
role() { psql -q -h 127.0.0.1 -U postgres -c "ALTER ROLE postgres $1"; }
run() {
  "$bin" run --backends postgres --scenarios alloc --clients 16 --window-s 10 --rounds 3 --warmup-s 1 ${EXTRA:-} \
    --out "bench-results/runAD/pg-$1" > "/tmp/role-$1.log" 2>&1
}
trap 'role "RESET ALL"' EXIT
for i in $(seq "${FIRST:-1}" $((${FIRST:-1} + pairs - 1))); do
  if (( i % 2 == 1 )); then run "default-$name$i"; role "SET $setting"; run "$name$i"; role "RESET ALL"
  else role "SET $setting"; run "$name$i"; role "RESET ALL"; run "default-$name$i"; fi
done
