#!/usr/bin/env python3
"""Run-queue wait vs CPU per process group over a window: python3 schedwait.py SECONDS"""
import os, sys, time, collections
def snap():
    out = collections.defaultdict(lambda: [0,0,0])
    for pid in os.listdir('/proc'):
        if not pid.isdigit(): continue
        try:
            comm = open(f'/proc/{pid}/comm').read().strip()
            cmd = open(f'/proc/{pid}/cmdline').read().split('\0')
        except OSError: continue
        if comm.startswith('postgres') or comm == 'postmaster': group='postgres'
        elif comm == 'loadgen' and 'serve' in cmd: group='server'
        elif comm == 'loadgen': group='loadgen'
        else: group='other'
        try: tasks = os.listdir(f'/proc/{pid}/task')
        except OSError: continue
        for t in tasks:
            try: a,b,c = map(int, open(f'/proc/{pid}/task/{t}/schedstat').read().split())
            except (OSError, ValueError): continue
            g = out[group]; g[0]+=a; g[1]+=b; g[2]+=c
    return out
s = float(sys.argv[1]); a = snap(); time.sleep(s); b = snap()
for g in sorted(b):
    d = [b[g][i]-a.get(g,[0,0,0])[i] for i in range(3)]
    print(f"{g:10s} cpu {d[0]/1e9/s:5.2f} cores  runqueue-wait {d[1]/1e9/s:5.2f} thread-s/s  slices/s {d[2]/s:8.0f}  wait per slice {d[1]/max(d[2],1)/1e3:7.1f} us")
