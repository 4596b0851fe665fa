#!/bin/bash
# every 10 s: the claim's plan with buffers in each loadgen database
while true; do
  for db in $(psql -U postgres -h 127.0.0.1 -Atc "select datname from pg_database where datname like 'sb_loadgen_%'"); do
    echo "=== $(date +%T) $db"; psql -U postgres -h 127.0.0.1 -d $db -f /tmp/exp/claim-explain.sql 2>&1 | grep -vE '^(BEGIN|ROLLBACK)$'
  done
  sleep 10
done
