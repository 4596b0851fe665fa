#!/bin/bash
# every 2 s: dead/live tuples and index sizes of host_ranks and mandelboxes in each loadgen database
while true; do
  for db in $(psql -U postgres -h 127.0.0.1 -Atc "select datname from pg_database where datname like 'sb_loadgen_%'"); do
    psql -U postgres -h 127.0.0.1 -d $db -Atc "select now()::time(0), relname, n_live_tup, n_dead_tup, n_tup_upd, n_tup_hot_upd, pg_relation_size(relid), (select pg_relation_size('host_ranks_claim_order')) from pg_stat_user_tables where relname in ('host_ranks','mandelboxes')" 2>/dev/null
  done
  sleep 2
done
