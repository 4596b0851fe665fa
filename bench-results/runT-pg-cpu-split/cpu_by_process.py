#!/usr/bin/env python3
# Samples CPU (utime+stime, all threads) of process groups over an interval: postgres, loadgen serve (server), loadgen (parent and others).
import os, sys, time
HZ = os.sysconf('SC_CLK_TCK')
def snap():
    groups = {}
    for pid in os.listdir('/proc'):
        if not pid.isdigit(): continue
        try:
            with open(f'/proc/{pid}/stat') as f: st = f.read()
            with open(f'/proc/{pid}/cmdline','rb') as f: cmd = f.read().replace(b'\0', b' ').decode(errors='replace')
            with open(f'/proc/{pid}/comm') as f: comm = f.read().strip()
        except OSError: continue
        rest = st[st.rindex(')')+2:].split()
        ticks = int(rest[11]) + int(rest[12])
        if comm == 'postgres': g = 'postgres'
        elif 'loadgen' in cmd and ' serve' in cmd: g = 'server'
        elif 'loadgen' in cmd and ' hosts' in cmd: g = 'loadgen-hosts'
        elif 'loadgen' in cmd: g = 'loadgen'
        else: g = 'other'
        groups[(g, pid)] = ticks
    return groups
def total():
    with open('/proc/stat') as f: parts = f.readline().split()[1:]
    vals = list(map(int, parts)); return sum(vals), vals[3] + vals[4]
interval = float(sys.argv[1]) if len(sys.argv) > 1 else 5
a, (ta, ia) = snap(), total(); time.sleep(interval); b, (tb, ib) = snap(), total()
sums = {}
for k, v in b.items():
    sums[k[0]] = sums.get(k[0], 0) + v - a.get(k, 0)
busy = ((tb - ta) - (ib - ia)) / HZ / interval
print(f"machine busy {busy:.2f} cores of {os.cpu_count()}; " + ", ".join(f"{g} {t/HZ/interval:.2f}" for g, t in sorted(sums.items(), key=lambda x: -x[1])))
