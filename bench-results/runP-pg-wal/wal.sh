#!/bin/bash
# usage: wal.sh BIN OUTDIR ; runs a 16-client Allocate window and samples WAL stats over 8 s in its middle
bin=$1; out=$2; mkdir -p $out
psql -qAt -h 127.0.0.1 -U postgres -d postgres -c "CREATE EXTENSION IF NOT EXISTS pg_walinspect" >/dev/null
$bin run --backends postgres --scenarios alloc --clients 16 --window-s 30 --warmup-s 1 --out $out/run > $out/run.log 2>&1 &
pid=$!
# wait for the measured window: the allocation point starts after setup; poll the log for progress
for i in $(seq 1 240); do grep -q "allocate x16" $out/run.log 2>/dev/null && break; sleep 0.5; done
sleep 10
l1=$(psql -qAt -h 127.0.0.1 -U postgres -d postgres -c "SELECT pg_current_wal_lsn()")
sleep 8
l2=$(psql -qAt -h 127.0.0.1 -U postgres -d postgres -c "SELECT pg_current_wal_lsn()")
psql -h 127.0.0.1 -U postgres -d postgres -c "SELECT \"resource_manager/record_type\" AS record, count, combined_size FROM pg_get_wal_stats('$l1','$l2', true) WHERE count > 0 ORDER BY count DESC" > $out/wal-stats.txt
echo "lsn $l1 $l2" >> $out/wal-stats.txt
psql -qAt -h 127.0.0.1 -U postgres -d postgres -c "SELECT sum(count), sum(combined_size) FROM pg_get_wal_stats('$l1','$l2', false)" >> $out/wal-stats.txt
wait $pid
psql -qAt -h 127.0.0.1 -U postgres -d postgres -c "DROP EXTENSION pg_walinspect" >/dev/null
