#!/usr/bin/env python3
"""Samples pg_stat_activity (backends of databases named sb_loadgen_*) for SECONDS, every ~5 ms, and
counts (state, wait_event_type, wait_event, statement kind). Usage: waits.py SECONDS"""
import subprocess, sys, time, collections
secs = float(sys.argv[1])
sql = ("select coalesce(state,'-'), coalesce(wait_event_type,'CPU'), coalesce(wait_event,'-'), "
       "left(regexp_replace(query,'\\s+',' ','g'),40) from pg_stat_activity where datname like 'sb_loadgen_%' "
       "and pid <> pg_backend_pid();")
p = subprocess.Popen(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-At", "-F", "|"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
counts = collections.Counter(); samples = 0
end = time.time() + secs
while time.time() < end:
    p.stdin.write(sql + "\\echo __END__\n"); p.stdin.flush()
    while True:
        line = p.stdout.readline().strip()
        if line == "__END__": break
        state, wtype, wevent, q = (line.split("|") + ["", "", "", ""])[:4]
        if state == "active":
            counts[(wtype, wevent, q)] += 1
        else:
            counts[(state, wtype + ":" + wevent, "")] += 1
    samples += 1
    time.sleep(0.005)
p.stdin.close()
print(f"{samples} samples; backends in each (state or wait, statement), averaged per sample:")
for (a, b, q), n in counts.most_common(25):
    print(f"{n/samples:6.3f}  {a:14s} {b:22s} {q}")
